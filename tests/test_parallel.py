"""Folds in parallel on one machine (here two CPU processes at once), and a SLURM job array."""

import json

import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import load_config
from pipeline.parallel import train_parallel
from pipeline.train import fold_dir
from tests.conftest import make_tiny_set


@pytest.mark.timeout(600)
def test_two_folds_at_once_then_one_summary(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    overrides += ["train.epochs=3"]
    cfg = load_config(None, overrides)
    summary = train_parallel(cfg, None, overrides, ["", ""], [0, 1], poll_s=0.2)
    spans = {}
    for fold in (0, 1):
        out = fold_dir(cfg, fold)
        assert (out / "oof.csv").is_file() and "fold" in (out / "train.log").read_text()
        spans[fold] = ((out / "config.yaml").stat().st_mtime, (out / "oof.csv").stat().st_mtime)
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the two fits overlapped
    assert sorted(summary["folds"]) == [0, 1]
    saved = json.loads((cfg.run_dir / "cv.json").read_text())
    assert saved["n_images"] == int((folds["fold"] < 2).sum())  # each validation image once
    oof = pd.read_csv(cfg.run_dir / "oof.csv")
    assert oof["image_name"].is_unique
    # a rerun starts nothing: both folds are finished
    assert train_parallel(cfg, None, overrides, ["", ""], [0, 1], poll_s=0.2)["n_images"] == saved["n_images"]


def test_a_failed_fold_is_named_with_its_log(tmp_path):
    _, overrides = make_tiny_set(tmp_path)
    overrides += ["model.backbone=no_such_net"]
    cfg = load_config(None, overrides)
    with pytest.raises(UserError, match=r"fold\(s\) \[0, 2\] failed; their logs: .*fold0/train.log"):
        train_parallel(cfg, None, overrides, ["0", "1"], [0, 2], poll_s=0.2)
    assert "no_such_net" in (fold_dir(cfg, 0) / "train.log").read_text()
