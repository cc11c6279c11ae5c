"""Folds in parallel on one machine (here two CPU processes at once), and a SLURM job array."""

import json

import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import load_config
from pipeline.parallel import train_parallel
from pipeline.train import fold_dir
from tests.conftest import make_tiny_set, tiny_test_set


@pytest.mark.timeout(600)
def test_two_folds_at_once_then_one_summary(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    overrides += ["train.epochs=3"]
    cfg = load_config(None, overrides)
    summary = train_parallel(cfg, None, overrides, ["", ""], [0, 1], poll_s=0.2)
    spans = {}
    for fold in (0, 1):
        out = fold_dir(cfg, fold)
        assert (out / "oof.csv").is_file() and (out / "train.log").is_file()
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


def test_slurm_array_over_the_pending_folds(tmp_path):
    import os
    import time

    from pipeline.slurm import write_slurm
    from pipeline.train import resume_checkpoint
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["slurm.partition=gpu", "slurm.time='12:00:00'",
                                         "slurm.cpus_per_task=6"])
    (fold_dir(cfg, 1)).mkdir(parents=True)
    (fold_dir(cfg, 1) / "oof.csv").write_text("finished\n")  # fold 1 is done: not in the array
    submit = write_slurm(cfg, "configs/x.yaml", ["train.epochs=3"])
    train = (submit.parent / "train.sbatch").read_text()
    for line in ("#SBATCH --array=0,2", "#SBATCH --gpus-per-task=1", "#SBATCH --partition=gpu",
                 "#SBATCH --time=12:00:00", "#SBATCH --cpus-per-task=6", "#SBATCH --requeue",
                 "#SBATCH --signal=SIGUSR1@120"):
        assert line in train.splitlines(), line
    assert ("scripts/train.py --config configs/x.yaml train.epochs=3 --folds $SLURM_ARRAY_TASK_ID "
            "--no-summary") in train
    assert "#SBATCH --open-mode=append" in train.splitlines()
    summary = (submit.parent / "summary.sbatch").read_text()
    assert "--summary-only" in summary and "--gpus-per-task" not in summary
    assert "sbatch --dependency=afterok:${array%%;*} summary.sbatch" in submit.read_text()
    # a preempted task resumes from the newest checkpoint Lightning left
    out = fold_dir(cfg, 0)
    out.mkdir(parents=True)
    (out / "last.ckpt").write_bytes(b"a")
    (out / "hpc_ckpt_1.ckpt").write_bytes(b"b")
    now = time.time()
    os.utime(out / "last.ckpt", (now - 60, now - 60))
    assert resume_checkpoint(out).name == "hpc_ckpt_1.ckpt"
    os.utime(out / "last.ckpt", (now + 60, now + 60))
    assert resume_checkpoint(out).name == "last.ckpt"
    bare = load_config(None, overrides + ["slurm.time=12:00:00"])  # unquoted: YAML's 43200
    with pytest.raises(UserError, match="slurm.time=43200 is a bare number"):
        write_slurm(bare, None, [])
    for fold in (0, 2):
        fold_dir(cfg, fold).mkdir(parents=True, exist_ok=True)
        (fold_dir(cfg, fold) / "oof.csv").write_text("finished\n")
    assert write_slurm(cfg, None, []) is None  # nothing left to train: nothing written


def test_summary_only_needs_a_finished_fold(tmp_path):
    from pipeline.train import summarize_finished
    _, overrides = make_tiny_set(tmp_path)
    with pytest.raises(UserError, match="no finished fold"):
        summarize_finished(load_config(None, overrides))


@pytest.mark.timeout(600)
def test_inference_sharded_over_two_slots_then_one_ensemble(tmp_path):
    from pipeline.parallel import infer_parallel
    from pipeline.submissions import read_manifest
    from pipeline.submit import check_submission
    from pipeline.train import train_all
    folds, overrides = make_tiny_set(tmp_path)
    overrides += tiny_test_set(tmp_path, folds) + [
        "train.epochs=1", "infer.views=[identity,hflip]", "train.progress_bar=false"]
    cfg = load_config(None, overrides)
    train_all(cfg)
    output = infer_parallel(cfg, None, overrides, ["", ""], poll_s=0.2)
    check_submission(output, tmp_path / "sample.csv")
    manifest = read_manifest(tmp_path / "subs")
    assert len(manifest) == 3 * 2 and manifest["n"].is_unique  # 3 folds x 2 views, two shards
    assert sorted(set(manifest["fold"])) == [0, 1, 2]
    assert json.loads((tmp_path / "subs" / "ensemble.json").read_text())["files"].__len__() == 6
    oof = pd.read_csv(cfg.run_dir / "oof_tta.csv")
    assert sorted(oof["image_name"]) == sorted(folds["image_name"])  # every fold's OOF, once
    assert (cfg.run_dir / "infer_shard0.log").is_file() and (cfg.run_dir / "infer_shard1.log").is_file()


def test_a_fold_being_trained_is_not_trained_twice(tmp_path):
    from pipeline.train import fold_lock, train_fold
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["train.epochs=1"])
    out = fold_dir(cfg, 0)
    out.mkdir(parents=True)
    with fold_lock(out), pytest.raises(UserError, match="is being trained by another process"):
        train_fold(cfg, 0, folds)
