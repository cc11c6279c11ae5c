"""Checkpoints and CV on the 2020 AUC, the 9-class diagnosis target, evaluation resize, seeding."""

import json

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_lightning.callbacks import Callback

from pipeline.cli import UserError
from pipeline.config import DataConfig, ModelConfig, TrainConfig, load_config
from pipeline.data import (
    ImageDataset,
    eval_transform,
    make_loader,
    seed_transform,
    train_transform,
)
from pipeline.diagnosis import CLASSES, MEL, class_of, diagnosis_labels
from pipeline.model import MelanomaModel, load_model, score_logit
from pipeline.train import build_trainer, fold_dir, train_all, train_fold
from tests.conftest import make_tiny_set


def with_external_in_validation(folds: pd.DataFrame) -> pd.DataFrame:
    """Spread-mode shape: every other patient of the tiny set becomes an external lesion."""
    ext = folds["patient_id"].str[3:].astype(int) % 4 == 1
    return folds.assign(source=np.where(ext, "isic2019", "isic2020"))


def test_checkpoint_chosen_by_2020_auc_when_external_rows_are_in_validation(tmp_path):
    folds, overrides = make_tiny_set(tmp_path, n_patients=16)
    folds = with_external_in_validation(folds)
    folds.to_csv(tmp_path / "folds.csv", index=False)
    cfg = load_config(None, overrides + ["train.epochs=4", "train.lr=0.02"])
    assert cfg.train.monitor == "val_auc_2020"
    summary = train_all(cfg, [0])
    out = fold_dir(cfg, 0)
    metrics = pd.read_csv(next(out.glob("csv/version_*/metrics.csv")))
    per_epoch = metrics.dropna(subset=["val_auc_2020"]).set_index("epoch")
    assert (per_epoch["val_auc"] != per_epoch["val_auc_2020"]).any()  # the mixed AUC differs
    ckpt = torch.load(out / "best.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] == "val_auc_2020"
    assert float(state["best_model_score"]) == pytest.approx(per_epoch["val_auc_2020"].max())
    saved = json.loads((cfg.run_dir / "cv.json").read_text())
    assert saved["monitor"] == "val_auc_2020" and saved["checkpoint"] == "best"
    assert saved["cv_auc_metric"] == "oof_auc_2020"
    assert saved["cv_auc"] == pytest.approx(summary["oof_auc_2020"])
    oof = pd.read_csv(out / "oof.csv")
    part = oof[oof.source == "isic2020"]
    from sklearn.metrics import roc_auc_score
    assert saved["folds_2020"]["0"] == pytest.approx(roc_auc_score(part["target"], part["pred"]))


class FallingAUC(Callback):
    """Makes the monitored AUC fall every epoch: epoch 0 stays the best, the last is the last."""

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.callback_metrics["val_auc_2020"] = torch.tensor(0.9 - 0.1 * trainer.current_epoch)


def test_last_checkpoint_is_the_last_epoch_and_cv_scores_the_one_inference_uses(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["train.epochs=3", "infer.checkpoint=last"])
    oof = train_fold(cfg, 0, folds, callbacks=[FallingAUC()])
    out = fold_dir(cfg, 0)
    best = torch.load(out / "best.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == 0 and last["epoch"] == 2  # Lightning's save_last kept epoch 0
    valid = folds[folds.fold == 0].reset_index(drop=True)
    from pipeline.train import predict_oof
    by_last = predict_oof(cfg, valid, out / "last.ckpt", 0)
    by_best = predict_oof(cfg, valid, out / "best.ckpt", 0)
    assert not np.allclose(by_last["pred"], by_best["pred"])
    np.testing.assert_allclose(oof["pred"], by_last["pred"], rtol=1e-5)
    assert set(oof["checkpoint"]) == {"last"}
    assert train_all(cfg, [0])["checkpoint"] == "last"
    # inference switched to best.ckpt: the finished fold is scored again, not refitted
    cfg = load_config(None, overrides + ["train.epochs=3", "infer.checkpoint=best"])
    summary = train_all(cfg, [0])
    assert summary["checkpoint"] == "best"
    rescored = pd.read_csv(out / "oof.csv")
    np.testing.assert_allclose(rescored["pred"], by_best["pred"], rtol=1e-5)
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2


def test_unknown_monitor_refused(tmp_path):
    _, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["train.monitor=val_loss"])
    with pytest.raises(UserError, match="train.monitor must be one of"):
        build_trainer(cfg, tmp_path)


def test_every_real_2020_diagnosis_maps_to_a_class(real_data):
    train = pd.read_csv(real_data / "train.csv")
    labels = diagnosis_labels(train["diagnosis"], train["target"], "train.csv")
    counts = pd.Series(labels).map(dict(enumerate(CLASSES))).value_counts()
    assert counts["MEL"] == train["target"].sum() == 584
    assert counts["NV"] == 5193
    assert counts["BKL"] == 135 + 44 + 37 + 7  # seborrheic k., lentigo NOS, lichenoid k., solar lentigo
    assert counts["UNK"] == 27124 + 2  # unknown, atypical melanocytic proliferation, cafe-au-lait
    assert counts.sum() == len(train)
    ext = pd.read_csv(real_data / "external/train_cdeotte_jpeg-isic2019_tfrecord_folds.csv")
    assert set(ext["diagnosis"].map(class_of)) <= set(CLASSES) - {"UNK"}


def test_target_decides_melanoma_and_clashes_are_counted(caplog):
    diagnosis = pd.Series(["nevus", "melanoma", None, "MEL", "BCC"])
    target = pd.Series([1, 0, 0, 1, 0])
    with caplog.at_level("WARNING"):
        labels = diagnosis_labels(diagnosis, target, "t.csv")
    assert [CLASSES[i] for i in labels] == ["MEL", "UNK", "UNK", "MEL", "BCC"]
    assert "t.csv: 2 row(s) whose diagnosis disagrees" in caplog.text
    assert "t.csv: 1 row(s) without a diagnosis" in caplog.text


def test_score_logit_is_the_logit_of_p_mel():
    z = torch.randn(16, len(CLASSES))
    p_mel = torch.softmax(z, dim=1)[:, MEL]
    assert torch.allclose(torch.sigmoid(score_logit(z)), p_mel, atol=1e-6)
    binary = torch.randn(16, 1)
    assert torch.equal(score_logit(binary), binary[:, 0])


def test_diagnosis_target_trains_and_oof_holds_p_mel(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    folds["diagnosis"] = np.where(folds["target"] == 1, "melanoma", "nevus")
    folds.loc[folds.index % 3 == 0, "diagnosis"] = "unknown"
    folds.loc[folds["target"] == 1, "diagnosis"] = "melanoma"
    folds.to_csv(tmp_path / "folds.csv", index=False)
    cfg = load_config(None, overrides + ["model.target=diagnosis", "train.epochs=2"])
    oof = train_fold(cfg, 0, folds)
    model = load_model(str(fold_dir(cfg, 0) / "best.ckpt"), cfg.model)
    assert model.head.fc.out_features == len(CLASSES)
    valid = folds[folds.fold == 0].reset_index(drop=True)
    ds = ImageDataset(valid["image_path"], transform=eval_transform(cfg.data))
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        p_mel = torch.softmax(model.outputs(model.normalize(images)), dim=1)[:, MEL].numpy()
    np.testing.assert_allclose(oof["pred"], p_mel, rtol=1e-4, atol=1e-6)


def test_unknown_target_refused():
    with pytest.raises(UserError, match="model.target must be one of"):
        MelanomaModel.from_configs(ModelConfig(backbone="test_efficientnet", target="multi"), TrainConfig())


def test_eval_resize_full_keeps_the_whole_image():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:4] = 255  # a border stripe that a centre crop would cut
    data = DataConfig(image_size=64, crop_size=48)
    full = eval_transform(data)(image=image)["image"]
    assert full.shape == (48, 48, 3) and full[:2].mean() > 200
    data.eval_resize = "center_crop"
    crop = eval_transform(data)(image=image)["image"]
    assert crop.shape == (48, 48, 3) and crop.max() == 0
    data.eval_resize = "fit"
    with pytest.raises(UserError, match="data.eval_resize"):
        eval_transform(data)


def orientation(transform: A.Compose) -> tuple[int, int, int]:
    """Which of hflip / vflip / transpose fired, read off a marked image."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 1] = 255  # off the diagonal: every dihedral view moves it elsewhere
    out = transform(image=image)["image"]
    return tuple(int(x) for x in np.argwhere(out[..., 0] == 255)[0])


def test_seeded_passes_reach_all_eight_orientations():
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.Transpose(p=0.5)])
    seen = set()
    for seed in range(40):
        seed_transform(flips, seed)
        seen.add(orientation(flips))
    assert len(seen) == 8
    seed_transform(flips, 3)
    first = orientation(flips)
    seed_transform(flips, 3)
    assert orientation(flips) == first  # a seed is a fixed pass


def constant_set(tmp_path, n=16):
    import cv2
    path = tmp_path / "c.jpg"
    image = np.zeros((32, 32, 3), np.uint8)
    image[2:10, 4:20] = 200
    cv2.imwrite(str(path), image)
    data = DataConfig(image_size=32, crop_size=32)
    return ImageDataset([str(path)] * n, transform=train_transform(data, TrainConfig().aug))


def batches(ds, workers, seed=0):
    seed_transform(ds.transform, seed)
    torch.manual_seed(seed)
    loader = make_loader(ds, 4, workers, train=False)
    return [b["image"] for b in loader]


def test_loader_workers_draw_different_augmentations_reproducibly(tmp_path):
    ds = constant_set(tmp_path)
    two = batches(ds, 2)
    assert not torch.equal(two[0], two[1])  # worker 0 and worker 1 differ
    again = batches(ds, 2)
    assert all(torch.equal(a, b) for a, b in zip(two, again, strict=True))
    one = batches(ds, 0)
    assert all(torch.equal(a, b) for a, b in zip(one, batches(ds, 0), strict=True))


def test_limit_train_batches_one_means_one_batch(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["train.limit_train_batches=1", "train.epochs=4"])
    trainer = build_trainer(cfg, tmp_path / "out")
    assert trainer.limit_train_batches == 1 and isinstance(trainer.limit_train_batches, int)
    cfg = load_config(None, overrides + ["train.limit_train_batches=1.0"])
    assert build_trainer(cfg, tmp_path / "out").limit_train_batches == 1.0
    for bad in ("-1", "0.0", "1.5", "abc"):
        cfg = load_config(None, overrides + [f"train.limit_train_batches={bad}"])
        with pytest.raises(UserError, match="limit_train_batches"):
            build_trainer(cfg, tmp_path / "out")
