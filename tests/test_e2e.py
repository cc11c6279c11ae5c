"""End to end on a small generated set: folds, a short fit, TTA inference, ensemble, checked CSV."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.folds import run_folds
from pipeline.infer import run_infer
from pipeline.report import hidden_test_auc
from pipeline.submit import check_submission
from pipeline.synthetic import generate_synthetic
from pipeline.train import train_all
from tests.conftest import REPO


def demo_overrides(root, **extra):
    syn = root / "synthetic"
    items = {
        "synthetic.out_dir": syn, "synthetic.n_patients": 18, "synthetic.n_test_patients": 6,
        "synthetic.n_external_lesions": 10, "synthetic.positive_rate": 0.3,
        "synthetic.image_size": 64, "data.image_size": 48, "data.crop_size": 40,
        "data.train_csv": syn / "train.csv", "data.test_csv": syn / "test.csv",
        "data.sample_submission": syn / "sample_submission.csv",
        "data.train_images": syn / "jpeg/train", "data.test_images": syn / "jpeg/test",
        "folds.output": root / "folds.csv", "runs_dir": root / "runs",
        "infer.submissions_dir": root / "subs", "ensemble.output": root / "subs/ensemble.csv",
        "train.epochs": 2, "folds.n_folds": 3,
    }
    items.update(extra)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"{k}={v}" for k, v in items.items()])
    cfg.data.external[0].ground_truth_csv = str(syn / "external/ISIC_2019_Training_GroundTruth.csv")
    cfg.data.external[0].metadata_csv = str(syn / "external/ISIC_2019_Training_Metadata.csv")
    cfg.data.external[0].images = str(syn / "external/jpeg")
    return cfg


def test_library_chain(tmp_path):
    cfg = demo_overrides(tmp_path)
    generate_synthetic(cfg.synthetic)
    folds = run_folds(cfg)
    assert (folds.loc[folds.source == "isic2019", "fold"] == -1).all()
    summary = train_all(cfg)
    assert 0 <= summary["oof_auc"] <= 1
    out = run_infer(cfg)
    checked = check_submission(out, cfg.data.sample_submission)
    assert len(checked) == len(pd.read_csv(cfg.data.test_csv))
    manifest = pd.read_csv(tmp_path / "subs/manifest.csv")
    assert len(manifest) == 3 * 8
    assert json.loads(out.with_suffix(".json").read_text())["cv_auc"] is not None
    assert 0 <= hidden_test_auc(cfg, out) <= 1


def run_script(name, *args):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_scripts_report_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    result = run_script("make_folds", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: invalid config key 'train.epoch'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_make_demo(tmp_path):
    """The README's first command, in a copy of the repo so the user's outputs are untouched."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(tmp_path / "repo")], check=True)
    os.symlink(REPO / ".venv", tmp_path / "repo" / ".venv")
    stamp = tmp_path / "installed"  # the shared venv is set up already: no reinstall from the clone
    stamp.touch()
    result = subprocess.run(["make", "demo", f"STAMP={stamp}"], cwd=tmp_path / "repo",
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hidden test AUC" in result.stderr
    assert (tmp_path / "repo/submissions/demo/ensemble.csv").is_file()
    cv = json.loads((tmp_path / "repo/runs/demo/cv.json").read_text())
    assert cv["oof_auc"] > 0.65  # clearly above chance on the generated set (ceiling ~0.9)
