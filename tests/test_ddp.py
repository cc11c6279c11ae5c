"""DDP on the CPU (2 processes, gloo): validation scores each image once, OOF and the summary
come from rank 0 only, and match a single process on the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.train import fold_dir, predict_oof
from tests.conftest import REPO, make_tiny_set


@pytest.mark.timeout(600)
def test_two_process_validation_equals_one_process_row_for_row(tmp_path):
    folds, overrides = make_tiny_set(tmp_path, n_patients=15)
    folds = folds.drop(index=folds.index[folds.fold == 0][-1])  # 19 validation images: one padded
    folds.to_csv(tmp_path / "folds.csv", index=False)
    ddp = overrides + ["train.epochs=3", "train.devices=2", "train.accelerator=cpu"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    script = str(REPO / "tests" / "ddp_run.py")
    for mode in ("fit", "validate"):
        run = subprocess.run([sys.executable, script, mode, *ddp], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=500)
        assert run.returncode == 0, run.stderr[-3000:]
    cfg = load_config(None, overrides + ["train.epochs=3"])
    assert pd.read_csv(Path(cfg.runs_dir) / "world.csv").iloc[0, 0] == 2
    valid = folds[folds.fold == 0].reset_index(drop=True)
    gathered = pd.read_csv(Path(cfg.runs_dir) / "ddp_val.csv")
    assert sorted(gathered["index"]) == list(range(len(valid)))  # 19 rows: the padded repeat dropped
    single = predict_oof(cfg, valid, fold_dir(cfg, 0) / "best.ckpt", 0)
    np.testing.assert_allclose(gathered.sort_values("index")["prob"], single["pred"], rtol=1e-4, atol=1e-6)
    oof = pd.read_csv(fold_dir(cfg, 0) / "oof.csv")
    assert sorted(oof["image_name"]) == sorted(valid["image_name"])  # written once, by rank 0
    from pipeline.train import train_all
    single = train_all(load_config(None, overrides + ["train.epochs=3", f"runs_dir={tmp_path}/single"]), [0])
    ddp_cv = json.loads((cfg.run_dir / "cv.json").read_text())
    assert set(ddp_cv) == set(single) and ddp_cv["n_images"] == single["n_images"] == len(valid)
    # an unreadable validation image, skipped: the ranks then hold different row counts
    skipped = valid["image_path"].iloc[3]
    Path(skipped).write_bytes(Path(skipped).read_bytes()[:200])
    run = subprocess.run([sys.executable, script, "validate", *ddp, "data.skip_bad_images=true"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    gathered = pd.read_csv(Path(cfg.runs_dir) / "ddp_val.csv")
    assert sorted(gathered["index"]) == [i for i in range(len(valid)) if i != 3]
