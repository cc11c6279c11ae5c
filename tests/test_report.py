"""The closing summary: the ensemble's CV is labelled with how and on which rows it was measured."""

import json
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.report import summary_lines


@pytest.fixture
def cfg(tmp_path) -> Config:
    cfg = Config(experiment="exp1", runs_dir=str(tmp_path / "runs"))
    cfg.data.train_csv = str(tmp_path / "data" / "train.csv")  # no generator's _truth beside it
    cfg.ensemble.output = str(tmp_path / "submissions" / "ensemble.csv")
    return cfg


def _ensemble_lines(cfg: Config, **fields) -> list[str]:
    path = Path(cfg.ensemble.output).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"files": ["a.csv", "b.csv"], "weights": [0.5, 0.5], **fields}))
    return [x for x in summary_lines(cfg) if x.startswith(("ensemble", "members"))]


def test_in_sample_ensemble_auc_is_labelled_in_sample(cfg):
    line, = _ensemble_lines(cfg, method="weighted", cv_auc=0.93, cv_auc_rows="2020",
                            cv_auc_all=0.91, cv_auc_source="oof_in_sample")
    assert line.startswith("ensemble OOF AUC (in-sample: weights fitted on these rows)")
    assert "0.9300" in line and "on 2020 images (all images 0.9100)" in line
    assert "weighted of 2 files" in line


def test_out_of_sample_ensemble_auc_names_its_rows(cfg):
    line, = _ensemble_lines(cfg, method="rank", cv_auc=0.9, cv_auc_rows="all", cv_auc_all=0.9,
                            cv_auc_source="oof")
    assert line.startswith("ensemble OOF AUC ") and "in-sample" not in line
    assert "0.9000  (on all images; rank of 2 files)" in line


def test_members_mean_is_not_called_an_ensemble_oof_auc(cfg):
    line, = _ensemble_lines(cfg, method="mean", cv_auc=0.8, cv_auc_rows=None, cv_auc_all=None,
                            cv_auc_source="manifest_mean")
    assert line.startswith("members' mean CV AUC") and "OOF" not in line


def test_no_ensemble_cv_no_line(cfg):
    assert _ensemble_lines(cfg, method="mean", cv_auc=None, cv_auc_source=None) == []


def test_report_says_which_auc_chose_the_checkpoints(cfg):
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "cv.json").write_text(json.dumps({
        "oof_auc": 0.90, "oof_auc_ci95": [0.88, 0.92], "oof_auc_2020": 0.85,
        "oof_auc_2020_ci95": [0.80, 0.89], "monitor": "val_auc_2020", "checkpoint": "best",
        "cv_auc": 0.85, "cv_auc_metric": "oof_auc_2020"}))
    lines = summary_lines(cfg)
    assert any(x.startswith("CV AUC, 2020 images only  0.8500  95% CI [0.8000, 0.8900]") for x in lines)
    assert any("best.ckpt chosen by val_auc_2020; the CV quoted is oof_auc_2020 = 0.8500" in x
               for x in lines)


def test_an_older_cv_json_without_the_2020_interval_still_draws(tmp_path):
    import pandas as pd

    from pipeline.report_html import roc_section
    cfg = Config(experiment="old", runs_dir=str(tmp_path))
    cfg.run_dir.mkdir(parents=True)
    pd.DataFrame({"target": [0, 1, 0, 1], "pred": [0.1, 0.9, 0.4, 0.6], "fold": [0, 0, 1, 1],
                  "source": "isic2020"}).to_csv(cfg.run_dir / "oof.csv", index=False)
    assert "data:image/png" in roc_section(cfg, {"oof_auc_ci95": [0.5, 0.9]})
