import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import load_config
from pipeline.infer import run_infer, tta_table
from pipeline.submissions import read_manifest
from pipeline.train import fold_dir, train_all
from tests.conftest import make_tiny_set


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    folds, overrides = make_tiny_set(root)
    test = folds[["image_name"]].iloc[::3]
    test.to_csv(root / "test.csv", index=False)
    overrides += [f"data.test_csv={root}/test.csv", f"data.test_images={root}/jpeg",
                  f"infer.submissions_dir={root}/subs", f"ensemble.output={root}/subs/ensemble.csv",
                  "train.epochs=1"]
    train_all(load_config(None, overrides))
    return root, overrides, test


def test_infer_writes_numbered_files_manifest_oof_table_and_ensemble(trained):
    root, overrides, test = trained
    cfg = load_config(None, overrides + ["infer.views=[identity,hflip,rot90]", "infer.random_passes=1"])
    out = run_infer(cfg)
    manifest = read_manifest(root / "subs")
    assert len(manifest) == 3 * 4  # 3 folds x (3 views + 1 random pass)
    assert sorted(manifest["n"]) == list(range(1, 13))
    assert set(manifest["view"]) == {"identity", "hflip", "rot90", "random0"}
    for _, row in manifest.iterrows():
        sub = pd.read_csv(root / "subs" / row["file"])
        assert list(sub.columns) == ["image_name", "target"]
        assert list(sub["image_name"]) == list(test["image_name"])
        assert sub["target"].between(0, 1).all()
    ens = pd.read_csv(out)
    assert sorted(ens["image_name"]) == sorted(test["image_name"])
    oof = pd.read_csv(cfg.run_dir / "oof_tta.csv")
    assert {"pred_identity", "pred_hflip", "pred_rot90", "pred_random0", "pred_tta"} <= set(oof)
    assert len(oof) == 48
    # identity view on OOF reproduces the OOF predictions written at training time
    base = pd.read_csv(cfg.run_dir / "oof.csv").set_index("image_name")["pred"]
    np.testing.assert_allclose(oof.set_index("image_name")["pred_identity"], base.loc[oof.image_name],
                               rtol=1e-4, atol=1e-6)
    table = json.loads((cfg.run_dir / "tta_oof.json").read_text())
    assert set(table["oof_auc"]) == {"identity", "hflip", "rot90", "random0", "tta"}
    # a second run takes new numbers and overwrites nothing
    run_infer(load_config(None, overrides + ["infer.views=[identity]", "infer.oof_tta=false"]))
    again = read_manifest(root / "subs")
    assert sorted(again["n"]) == list(range(1, 16))
    ens2 = json.loads((root / "subs" / "ensemble.json").read_text())
    assert len(ens2["files"]) == 3  # the ensemble of a run uses that run's files


def test_tta_table_gain_is_relative_to_identity():
    oof = pd.DataFrame({"target": [0, 1, 0, 1], "pred_identity": [0.1, 0.2, 0.3, 0.4],
                        "pred_hflip": [0.1, 0.9, 0.2, 0.8], "pred_tta": [0.1, 0.5, 0.2, 0.6]})
    table = tta_table(oof)
    assert table.loc["identity", "oof_auc"] == 0.75
    assert table.loc["hflip", "gain_vs_identity"] == pytest.approx(0.25)


def test_missing_checkpoints_named(trained):
    root, overrides, _ = trained
    cfg = load_config(None, overrides)
    moved = fold_dir(cfg, 1) / "best.ckpt"
    moved.rename(moved.with_suffix(".bak"))
    try:
        with pytest.raises(UserError, match=r"experiment 'tiny': no best.ckpt for fold\(s\) \[1\]"):
            run_infer(cfg)
    finally:
        moved.with_suffix(".bak").rename(moved)
    with pytest.raises(UserError, match="experiment 'nothing'.*train-all"):
        run_infer(load_config(None, overrides + ["experiment=nothing"]))


def test_checkpoint_of_other_architecture(trained, tmp_path):
    root, overrides, _ = trained
    cfg = load_config(None, overrides)
    saved = (cfg.run_dir / "config.yaml").read_text()
    (cfg.run_dir / "config.yaml").write_text(saved.replace("test_efficientnet", "test_resnet"))
    try:
        with pytest.raises(UserError, match="trained with backbone 'test_efficientnet'"):
            run_infer(cfg)
    finally:
        (cfg.run_dir / "config.yaml").write_text(saved)


def test_missing_test_images_named(trained, tmp_path):
    root, overrides, test = trained
    bad = tmp_path / "test.csv"
    pd.concat([test, pd.DataFrame({"image_name": ["ISIC_NOPE"]})]).to_csv(bad, index=False)
    with pytest.raises(UserError, match=r"1 of \d+ listed image\(s\) missing.*ISIC_NOPE"):
        run_infer(load_config(None, overrides + [f"data.test_csv={bad}"]))
