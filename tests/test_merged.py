"""The blog's data: the merged external 512x512 set (one marking.csv split by its source column),
and the blog's recipe as a config (AdvProp B5, OneCycle momentum, 16-bit, 7 epochs)."""

import numpy as np
import pandas as pd
import pytest
from pytorch_lightning.callbacks import Callback

from pipeline.cli import UserError
from pipeline.config import ModelConfig, TrainConfig, load_config
from pipeline.folds import check_folds, make_folds
from pipeline.merge import merge_tables
from pipeline.model import MelanomaModel
from tests.conftest import REPO

HEADER = "image_id,patient_id,target,source,sex,age_approx,anatom_site_general_challenge\n"
ROWS = [  # the layout of shonenkov's marking.csv, with its three sources
    ("ISIC_0001", "IP_1", 0, "ISIC20", "male", 45, "torso"),
    ("ISIC_0002", "IP_1", 1, "ISIC20", "male", 45, "torso"),
    ("ISIC_0003", "IP_2", 0, "ISIC20", "female", 50, "head/neck"),
    ("ISIC_0004", "IP_3", 1, "ISIC20", "female", 60, "lower extremity"),
    ("ISIC_0005", "IP_4", 0, "ISIC20", "male", 30, "torso"),
    ("ISIC_0006", "IP_5", 1, "ISIC20", "male", 70, "torso"),
    ("ISIC_0000001", "HAM_0001", 1, "ISIC19", "male", 55, "torso"),
    ("ISIC_0000002", "HAM_0001", 1, "ISIC19", "male", 55, "torso"),
    ("ISIC_0000003", "", 0, "ISIC19", "female", 40, "torso"),
    ("ISIC_0000004", "BCN_0007", 0, "ISIC19", "female", 40, "upper extremity"),
    ("ISIC_0014001", "", 0, "SLATMD", "", "", ""),
    ("ISIC_0014002", "", 1, "SLATMD", "", "", ""),
]


def marking(tmp_path, rows=ROWS) -> list[str]:
    """A marking.csv and its JPEG folder; returns the overrides that read them."""
    root = tmp_path / "merged"
    images = root / "512x512-dataset-melanoma" / "512x512-dataset-melanoma"
    images.mkdir(parents=True)
    lines = [",".join(str(v) for v in row) for row in rows]
    (root / "marking.csv").write_text(HEADER + "\n".join(lines) + "\n")
    for row in rows:
        (images / f"{row[0]}.jpg").write_bytes(b"\xff\xd8 stand-in \xff\xd9")
    return [f"data.merged.csv={root / 'marking.csv'}", f"data.merged.images={images}"]


def test_merged_csv_is_split_by_source(tmp_path, caplog):
    cfg = load_config(REPO / "configs/merged512_b5.yaml", marking(tmp_path))
    with caplog.at_level("INFO"):
        df = merge_tables(cfg.data).set_index("image_name")
    assert list(df.loc[["ISIC_0001", "ISIC_0002"], "patient_id"]) == ["IP_1", "IP_1"]
    assert (df.loc[df.index.str.len() == 9, "source"] == "isic2020").all()
    # ISIC 2019 rows carry ISIC's lesion id in patient_id: one lesion, one group
    assert df.loc["ISIC_0000001", "patient_id"] == df.loc["ISIC_0000002", "patient_id"] == "lesion:HAM_0001"
    assert df.loc["ISIC_0000003", "patient_id"] == "image:ISIC_0000003"
    assert df.loc["ISIC_0014001", "source"] == "SLATMD" and not df.loc["ISIC_0014001", "group_known"]
    assert df.loc["ISIC_0014002", "image_path"].endswith(
        "512x512-dataset-melanoma/512x512-dataset-melanoma/ISIC_0014002.jpg")
    assert "ISIC19: 4 image(s), 2 positive, 3 with a patient or lesion id" in caplog.text
    folds = make_folds(df.reset_index(), cfg.folds.__class__(n_folds=2))
    check_folds(folds)
    assert (folds.loc[folds.source != "isic2020", "fold"] == -1).all()
    with pytest.raises(UserError, match="only 75.0% of the 'ISIC19' images"):
        make_folds(df.reset_index(), cfg.folds.__class__(n_folds=2, external="spread"))


def test_merged_csv_without_2020_rows_or_source_column_is_refused(tmp_path):
    rows = [r[:3] + ("ISIC19",) + r[4:] for r in ROWS]
    with pytest.raises(UserError, match=r"no row has source='ISIC20'.*ISIC19"):
        merge_tables(load_config(REPO / "configs/merged512_b5.yaml", marking(tmp_path, rows)).data)
    (tmp_path / "merged" / "marking.csv").write_text("image_id,target\nISIC_1,0\n")
    with pytest.raises(UserError, match=r"marking.csv: missing required column\(s\) \['source'\]"):
        merge_tables(load_config(REPO / "configs/merged512_b5.yaml", [
            f"data.merged.csv={tmp_path / 'merged' / 'marking.csv'}"]).data)


def test_real_reduced_marking_csv_holds_every_2020_image(real_data):
    """The real marking.csv (reduced to image_id, target): 60,487 rows, 5,479 positive, and
    every 2020 training image with the competition's own target."""
    merged = pd.read_csv(real_data / "external" / "marking_merged_external_image_id_target_only.csv")
    assert len(merged) == 60487 and merged["image_id"].is_unique
    assert int(merged["target"].sum()) == 5479
    train = pd.read_csv(real_data / "train.csv")
    joined = train.merge(merged, left_on="image_name", right_on="image_id", suffixes=("", "_merged"))
    assert len(joined) == len(train) == 33126
    assert (joined["target"] == joined["target_merged"]).all()
    external = merged[~merged["image_id"].isin(train["image_name"])]
    assert len(external) == 60487 - 33126 and int(external["target"].sum()) == 5479 - 584


def test_blog_recipe_uses_advprop_normalisation_and_its_momentum():
    cfg = load_config(REPO / "configs/merged512_b5.yaml")
    assert cfg.model.backbone == "tf_efficientnet_b5.ap_in1k" and cfg.train.epochs == 7
    assert (cfg.train.base_momentum, cfg.train.max_momentum) == (0.90, 0.95)
    assert cfg.train.precision == "16-mixed" and cfg.train.label_smoothing == 0.05
    assert cfg.folds.n_folds == 5
    model = MelanomaModel.from_configs(ModelConfig(backbone=cfg.model.backbone, pretrained=False), TrainConfig())
    np.testing.assert_allclose(model.mean.flatten().numpy(), [127.5] * 3)  # AdvProp: 0.5, not ImageNet's
    np.testing.assert_allclose(model.std.flatten().numpy(), [127.5] * 3)


class Momentum(Callback):
    def __init__(self):
        self.betas = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.betas.append(optimizer.param_groups[0]["betas"][0])


def test_blog_recipe_trains_on_the_demo_shape_with_a_tiny_model(tmp_path):
    """The shipped config, only the model made tiny and untrained: it loads and trains."""
    from pipeline.train import train_fold
    from tests.conftest import make_tiny_set
    folds, tiny = make_tiny_set(tmp_path)
    keep = [o for o in tiny if o.split("=")[0] in ("folds.output", "runs_dir", "data.image_size",
                                                    "data.crop_size", "data.num_workers")]
    cfg = load_config(REPO / "configs/merged512_b5.yaml", keep + [
        "model.backbone=test_efficientnet", "model.pretrained=false", "data.batch_size=8",
        "train.limit_train_batches=4", "train.epochs=1", "train.progress_bar=false"])
    record = Momentum()
    train_fold(cfg, 0, folds, callbacks=[record])
    assert len(record.betas) == 4
    assert record.betas[0] == pytest.approx(0.95)  # OneCycle starts at max_momentum
    assert min(record.betas) == pytest.approx(0.90, abs=0.011)  # and dips to base_momentum
