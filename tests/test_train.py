import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_lightning.callbacks import Callback
from sklearn.metrics import roc_auc_score

from pipeline.cli import UserError
from pipeline.config import load_config
from pipeline.data import BadImageError, split_fold
from pipeline.metrics import auc_2020, cv_summary
from pipeline.model import TrainingDiverged, load_model
from pipeline.train import fold_dir, train_all, train_fold
from tests.conftest import make_tiny_set


@pytest.fixture
def tiny(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    return folds, overrides


class RecordLR(Callback):
    def __init__(self):
        self.lrs, self.start_step = [], None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_cycle_stepped_per_optimizer_step(tiny, accumulate):
    folds, overrides = tiny
    cfg = load_config(None, overrides + [f"train.accumulate_grad_batches={accumulate}",
                                         "train.epochs=3", "train.pct_start=0.3"])
    rec = RecordLR()
    train_fold(cfg, 0, folds, callbacks=[rec])
    batches = len(split_fold(folds, 0).train) // cfg.data.batch_size  # drop_last
    total = math.ceil(batches / accumulate) * cfg.train.epochs
    lr, div, final = cfg.train.lr, cfg.train.div_factor, cfg.train.final_div_factor
    assert len(rec.lrs) == total
    assert rec.lrs[0] == pytest.approx(lr / div)
    assert max(rec.lrs) == pytest.approx(lr, rel=0.05)
    peak = int(np.argmax(rec.lrs))
    assert abs(peak - (0.3 * total - 1)) <= 1
    # the last optimizer step runs at the very end of the annealing, not part-way
    assert rec.lrs[-1] == pytest.approx(lr / div / final, rel=0.2, abs=lr / div / final)


def test_oof_each_image_once_in_own_fold_and_cv_equals_sklearn(tiny):
    folds, overrides = tiny
    cfg = load_config(None, overrides + ["train.epochs=4"])
    summary = train_all(cfg)
    oof = pd.read_csv(cfg.run_dir / "oof.csv")
    assert sorted(oof["image_name"]) == sorted(folds["image_name"])
    merged = oof.merge(folds[["image_name", "fold"]], on="image_name", suffixes=("", "_true"))
    assert (merged["fold"] == merged["fold_true"]).all()
    assert summary["oof_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["pred"]))
    saved = json.loads((cfg.run_dir / "cv.json").read_text())
    assert saved["oof_auc"] == pytest.approx(summary["oof_auc"])
    for fold, group in oof.groupby("fold"):
        assert saved["folds"][str(fold)] == pytest.approx(roc_auc_score(group["target"], group["pred"]))
    lo, hi = saved["oof_auc_ci95"]
    assert lo <= hi
    for name in ("best.ckpt", "last.ckpt", "config.yaml", "oof.csv"):
        assert (fold_dir(cfg, 0) / name).is_file()
    # the tiny set is learnable: a bright big disc marks a positive
    assert summary["oof_auc"] > 0.7


def test_finished_fold_skipped(tiny):
    folds, overrides = tiny
    cfg = load_config(None, overrides + ["train.epochs=1"])
    train_fold(cfg, 1, folds)
    stamp = (fold_dir(cfg, 1) / "oof.csv").stat().st_mtime_ns
    rec = RecordLR()
    train_fold(cfg, 1, folds, callbacks=[rec])
    assert rec.lrs == [] and (fold_dir(cfg, 1) / "oof.csv").stat().st_mtime_ns == stamp


class Interrupt(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("killed")


def test_interrupted_fit_resumes_from_saved_step(tiny):
    folds, overrides = tiny
    cfg = load_config(None, overrides + ["train.epochs=3"])
    with pytest.raises(RuntimeError, match="killed"):
        train_fold(cfg, 0, folds, callbacks=[Interrupt()])
    out = fold_dir(cfg, 0)
    assert (out / "last.ckpt").is_file() and not (out / "oof.csv").exists()
    saved_step = torch.load(out / "last.ckpt", weights_only=False)["global_step"]
    assert saved_step > 0
    rec = RecordLR()
    train_fold(cfg, 0, folds, callbacks=[rec])
    assert rec.start_step == saved_step
    batches = len(split_fold(folds, 0).train) // cfg.data.batch_size
    assert len(rec.lrs) == batches * 3 - saved_step
    assert (out / "oof.csv").is_file()


def test_auc_2020_uses_only_2020_rows():
    df = pd.DataFrame({
        "target": [0, 1, 0, 1, 0, 1],
        "pred": [0.1, 0.9, 0.2, 0.8, 0.95, 0.05],
        "source": ["isic2020"] * 4 + ["isic2019"] * 2,
        "patient_id": list("abcdef"), "fold": [0] * 6,
    })
    assert auc_2020(df) == 1.0
    summary = cv_summary(df, bootstrap=0)
    assert summary["oof_auc_2020"] == 1.0
    assert summary["oof_auc"] == pytest.approx(roc_auc_score(df["target"], df["pred"]))
    assert summary["oof_auc"] < 1.0


def test_single_class_validation_warns_and_gives_nan(caplog):
    df = pd.DataFrame({"target": [0, 0, 0], "pred": [0.1, 0.2, 0.3], "source": ["isic2020"] * 3,
                       "patient_id": ["a", "b", "c"], "fold": [0, 0, 0]})
    with caplog.at_level("WARNING"):
        summary = cv_summary(df, bootstrap=5)
    assert math.isnan(summary["oof_auc"]) and "only one class" in caplog.text


def test_fold_without_positive_warns(tiny, caplog):
    folds, _ = tiny
    folds = folds.copy()
    folds.loc[folds.fold == 2, "target"] = 0
    with caplog.at_level("WARNING"):
        split_fold(folds, 2)
    assert "fold 2: validation has a single class" in caplog.text


def test_corrupt_jpeg_named_or_skipped(tiny):
    folds, overrides = tiny
    bad = folds.loc[folds.fold == 1, "image_path"].iloc[0]
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    cfg = load_config(None, overrides + ["train.epochs=1"])
    with pytest.raises(BadImageError, match=bad):
        train_fold(cfg, 0, folds)
    cfg = load_config(None, overrides + ["train.epochs=1", "data.skip_bad_images=true",
                                         "experiment=skip"])
    oof = train_fold(cfg, 1, folds)
    # the unreadable validation image, and only it, has no prediction
    assert list(oof.loc[oof["pred"].isna(), "image_name"]) == [Path(bad).stem]


class PoisonLoss(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_with_fold_step_lr_and_keeps_last(tiny):
    folds, overrides = tiny
    cfg = load_config(None, overrides + ["train.epochs=3"])
    with pytest.raises(TrainingDiverged, match=r"fold 0: loss is not finite .* from step \d+ .*lr") as err:
        train_fold(cfg, 0, folds, callbacks=[PoisonLoss()])
    assert "from step 4 (epoch 1, lr 0.00" in str(err.value)  # 4 batches an epoch
    assert (fold_dir(cfg, 0) / "last.ckpt").is_file()


def test_checkpoint_of_other_architecture_refused(tiny):
    folds, overrides = tiny
    cfg = load_config(None, overrides + ["train.epochs=1"])
    train_fold(cfg, 2, folds)
    other = load_config(None, overrides + ["model.backbone=test_resnet"])
    with pytest.raises(UserError, match="trained with backbone 'test_efficientnet'.*test_resnet"):
        load_model(str(fold_dir(cfg, 2) / "best.ckpt"), other.model)


def test_unknown_fold_is_an_error(tiny):
    _, overrides = tiny
    with pytest.raises(UserError, match=r"fold\(s\) \[7\]"):
        train_all(load_config(None, overrides), [7])


def test_missing_folds_file(tmp_path):
    cfg = load_config(None, [f"folds.output={tmp_path}/none.csv"])
    with pytest.raises(UserError, match="make folds"):
        train_all(cfg)


def test_reduced_decode_reads_header_and_keeps_enough_pixels(tmp_path):
    import cv2

    from pipeline.data import jpeg_shape, read_image

    img = np.zeros((300, 520, 3), np.uint8)
    img[:, 260:] = (0, 0, 255)  # right half red in BGR
    path = str(tmp_path / "x.jpg")
    cv2.imwrite(path, img)
    with open(path, "rb") as f:
        assert jpeg_shape(f.read()) == (300, 520)
    assert read_image(path).shape == (300, 520, 3)
    half = read_image(path, min_side=128)  # 300 // 2 >= 128, 300 // 4 < 128
    assert half.shape == (150, 260, 3)
    assert half[75, 200, 0] > 200 and half[75, 10, 0] < 50  # RGB order kept
    assert read_image(path, min_side=299).shape == (300, 520, 3)
    assert jpeg_shape(b"not a jpeg") is None


def test_smoke_run_with_one_step_warmup(tmp_path):
    """10 optimizer steps with pct_start 0.1 crashed OneCycleLR (seen on the GPU test)."""
    folds, overrides = make_tiny_set(tmp_path, n_patients=16, size=64)
    cfg = load_config(None, overrides + ["train.epochs=2", "train.pct_start=0.1"])
    rec = RecordLR()
    oof = train_fold(cfg, 0, folds, callbacks=[rec])
    assert len(rec.lrs) == 10 and oof["pred"].notna().all()


def test_changed_training_settings_refused_but_workers_and_decode_path_allowed(tiny):
    folds, overrides = tiny
    cfg = load_config(None, overrides + ["train.epochs=1"])
    train_all(cfg, [0])
    train_all(load_config(None, overrides + ["train.epochs=1", "data.num_workers=1"]), [0])
    train_all(load_config(None, overrides + ["train.epochs=1", "data.decode=gpu"]), [0])
    with pytest.raises(UserError, match=r"train.epochs: 1 -> 3.*data.batch_size|data.batch_size: 8 -> 4; train.epochs: 1 -> 3"):
        train_all(load_config(None, overrides + ["train.epochs=3", "data.batch_size=4"]), [0])


def test_truncated_jpeg_is_an_error(tmp_path):
    import cv2

    from pipeline.data import read_image

    path = tmp_path / "t.jpg"
    cv2.imwrite(str(path), np.full((64, 64, 3), 128, np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # a copy killed part-way
    with pytest.raises(BadImageError, match="truncated JPEG"):
        read_image(str(path))
