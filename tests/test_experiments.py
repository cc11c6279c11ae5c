"""`make experiments`: one row per run folder, fallbacks for older files, blanks, never a crash."""

import json
import logging
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import Config, load_config, save_config
from pipeline.errors import UserError
from pipeline.experiments import experiments_frame, list_experiments
from pipeline.submissions import append_manifest

SCORES_HEADER = "time,competition,file,message,experiment,cv_auc,status,public_score,private_score,ref"
CV_MTIME = 1_700_000_000  # 2023-11-14 22:13 UTC


def _run(runs: Path, name: str, subs: Path, *overrides: str) -> Path:
    folder = runs / name
    cfg = load_config(None, [f"experiment={name}", f"runs_dir={runs}",
                             f"infer.submissions_dir={subs}", *overrides])
    save_config(cfg, folder)
    return folder


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def runs(tmp_path) -> Path:
    runs, subs = tmp_path / "runs", tmp_path / "submissions"
    new = _run(runs, "b5_512", subs, "model.backbone=efficientnet_b5", "data.image_size=512",
               "data.crop_size=456", "train.epochs=7", "model.metadata=true")
    _json(new / "cv.json", {
        "folds": {"0": 0.90, "1": 0.92}, "folds_2020": {"0": 0.86, "1": 0.88},
        "mean_fold_auc": 0.91, "mean_fold_auc_2020": 0.87, "oof_auc": 0.905,
        "oof_auc_2020": 0.865, "oof_auc_ci95": [0.89, 0.92], "oof_auc_2020_ci95": [0.84, 0.89],
        "cv_auc": 0.865, "cv_auc_metric": "oof_auc_2020"})
    _json(new / "tta_oof.json", {"oof_auc": {"identity": 0.860, "hflip": 0.858, "tta": 0.872}})
    for commit, time in [("1111111", "2024-01-02T10:00:00+00:00"), ("2222222", "2024-03-04T10:00:00+00:00")]:
        append_manifest(subs, {"n": 1, "file": "submission1.csv", "experiment": "b5_512",
                               "git_commit": commit, "time": time})
    append_manifest(subs, {"n": 3, "file": "submission3.csv", "experiment": "other",
                           "git_commit": "3333333", "time": "2025-01-01T00:00:00+00:00"})

    # an older run: cv.json without cv_auc or 2020 intervals, no TTA table, a config saved
    # before model.target existed
    old = _run(runs, "b3_old", subs, "model.backbone=efficientnet_b3", "data.image_size=384",
               "data.crop_size=320", "train.epochs=12")
    config = old / "config.yaml"
    config.write_text("".join(x for x in config.read_text().splitlines(True) if "target: binary" not in x))
    _json(old / "cv.json", {"folds": {"0": 0.80, "1": 0.84, "2": 0.85}, "oof_auc": 0.83,
                            "oof_auc_2020": 0.81, "oof_auc_ci95": [0.79, 0.86]})
    os.utime(old / "cv.json", (CV_MTIME, CV_MTIME))

    (runs / "broken").mkdir()
    (runs / "broken" / "config.yaml").write_text("model: [unclosed\n")
    (runs / "unresolved").mkdir()
    (runs / "unresolved" / "config.yaml").write_text("experiment: ${nope}\n")
    (runs / "bench").mkdir()  # speed figures, no config.yaml: not an experiment
    (runs / "bench" / "bench.json").write_text("{}")

    (subs / "scores.csv").write_text("\n".join([
        SCORES_HEADER,
        "2024-03-05T09:00:00+00:00,siim,ensemble.csv,first,b5_512,0.865,complete,0.9412,0.9301,1",
        "2024-03-06T09:00:00+00:00,siim,ensemble.csv,second,b5_512,0.865,complete,0.9388,0.9355,2",
        "2024-03-07T09:00:00+00:00,siim,ensemble.csv,third,b5_512,0.865,pending,,,3",
        "2024-03-07T09:00:00+00:00,siim,ensemble.csv,gone,deleted_run,0.9,complete,0.95,0.94,4",
    ]) + "\n")
    return runs


@pytest.fixture
def cfg(runs) -> Config:
    return load_config(None, [f"runs_dir={runs}", f"infer.submissions_dir={runs.parent / 'submissions'}"])


def _rows(frame: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["experiment"]: r for _, r in frame.iterrows()}


def test_one_row_per_experiment_folder(cfg, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.experiments"):
        frame = experiments_frame(cfg)
    assert list(frame["experiment"]) == ["b3_old", "b5_512", "broken", "unresolved"]
    assert "bench" in caplog.text and "no config.yaml" in caplog.text


def test_current_run_columns(cfg):
    row = _rows(experiments_frame(cfg))["b5_512"]
    assert row["cv_auc"] == 0.865 and row["cv_auc_2020"] == 0.865
    assert (row["cv_auc_2020_ci95_low"], row["cv_auc_2020_ci95_high"]) == (0.84, 0.89)
    assert row["mean_fold_auc"] == 0.87  # the quoted CV is 2020-only, so is the fold mean
    assert row["tta_gain"] == pytest.approx(0.012)
    assert (row["backbone"], row["image_size"], row["crop_size"], row["epochs"]) == ("efficientnet_b5", 512, 456, 7)
    assert row["target"] == "binary" and row["metadata"]
    assert row["git_commit"] == "2222222"  # the newest manifest row of this experiment
    assert row["best_public"] == 0.9412  # the best public score, not the latest
    assert (row["latest_public"], row["latest_private"]) == (0.9388, 0.9355)  # pending row has none
    assert pd.isna(row["error"])


def test_older_run_falls_back_and_leaves_blanks(cfg):
    row = _rows(experiments_frame(cfg))["b3_old"]
    assert row["cv_auc"] == 0.83 and row["cv_auc_2020"] == 0.81
    assert (row["cv_auc_2020_ci95_low"], row["cv_auc_2020_ci95_high"]) == (0.79, 0.86)
    assert row["mean_fold_auc"] == pytest.approx(0.83)
    assert row["target"] == "binary" and not row["metadata"]
    assert row["date"] == "2023-11-14 22:13"  # cv.json's modification time, UTC
    for column in ("tta_gain", "git_commit", "best_public", "latest_public", "latest_private", "error"):
        assert pd.isna(row[column]), column


def test_unreadable_config_is_listed_with_its_error(cfg):
    row = _rows(experiments_frame(cfg))["broken"]
    assert "broken/config.yaml" in row["error"] and "cannot parse YAML" in row["error"]
    assert pd.isna(row["cv_auc"]) and pd.isna(row["backbone"]) and pd.isna(row["epochs"])
    row = _rows(experiments_frame(cfg))["unresolved"]
    assert "unresolved/config.yaml: cannot read the config: Interpolation key 'nope'" in row["error"]


def test_unreadable_cv_json_is_an_error_cell_not_a_crash(cfg, runs):
    (runs / "b5_512" / "cv.json").write_text('{"cv_auc": 0.8')  # cut short
    row = _rows(experiments_frame(cfg))["b5_512"]
    assert "cv.json: cannot read it" in row["error"]
    assert pd.isna(row["cv_auc"]) and row["tta_gain"] == pytest.approx(0.012)


def test_writes_csv_and_html(cfg, runs):
    text = list_experiments(cfg)
    assert "b5_512" in text and "b3_old" in text and "0.8650" in text
    table = pd.read_csv(runs / "experiments.csv", dtype={"git_commit": "string"})
    assert list(table["experiment"]) == ["b3_old", "b5_512", "broken", "unresolved"]
    assert table.loc[1, "cv_auc"] == 0.865 and table.loc[1, "git_commit"] == "2222222"
    assert math.isnan(table.loc[0, "best_public"]) and table.loc[1, "best_public"] == 0.9412
    assert table.loc[1, "epochs"] == 7 and "cannot parse YAML" in table.loc[2, "error"]
    page = (runs / "experiments.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<td>b5_512</td>" in page and "<td>b3_old</td>" in page and "<td>broken</td>" in page
    assert "<td>0.8650</td>" in page and "<td>[0.8400, 0.8900]</td>" in page
    assert "<td>+0.0120</td>" in page and "0.905" not in page  # 4 decimals; all-rows OOF not shown
    assert ">nan<" not in page.lower() and "&lt;na&gt;" not in page.lower()  # blanks, not NaN
    assert not list(runs.glob(".*.tmp"))


def test_no_scores_file_leaves_scores_blank(cfg, runs):
    (runs.parent / "submissions" / "scores.csv").unlink()
    frame = experiments_frame(cfg)
    assert frame[["best_public", "latest_public", "latest_private"]].isna().all().all()


def test_garbled_scores_file_is_a_warning(cfg, runs, caplog):
    (runs.parent / "submissions" / "scores.csv").write_text("who,knows\n1,2\n")
    frame = experiments_frame(cfg)
    assert frame["best_public"].isna().all() and "scores are left out" in caplog.text


def test_missing_runs_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        experiments_frame(load_config(None, [f"runs_dir={tmp_path / 'nowhere'}"]))
