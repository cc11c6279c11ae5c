"""Folds in parallel on one machine: each fold its own `scripts/train.py` process, pinned to one
GPU (CUDA_VISIBLE_DEVICES), at most one fold per GPU at a time; the CV summary once all are done.
Inference shards the fold models over the same GPUs the same way; numbered files stay unique.

A fold is finished when its `oof.csv` exists (the marker `train_fold` leaves), so a rerun starts
only the folds still missing, and a killed fold resumes from its last.ckpt as in a serial run.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.infer import finish_infer, inferred_folds, trained_config
from pipeline.submissions import read_manifest
from pipeline.train import fold_dir, read_folds, train_all

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TRAIN_SCRIPT, INFER_SCRIPT = SCRIPTS / "train.py", SCRIPTS / "infer.py"


def script_command(script: Path, config_path: str | None, overrides: list[str], *tail: str) -> list[str]:
    """The command line of one stage script, as `make` runs it."""
    config = ["--config", config_path] if config_path else []
    return [sys.executable, str(script), *config, *overrides, *tail]


def pending_folds(cfg: Config, chosen: list[int] | None) -> list[int]:
    all_folds = sorted(int(f) for f in set(read_folds(cfg)["fold"]) if f >= 0)
    folds = chosen or all_folds
    return [f for f in folds if not (fold_dir(cfg, f) / "oof.csv").is_file()]


def gpu_id(text: str) -> str:
    """A `--gpus` entry: a device id or comma-separated ids (what CUDA_VISIBLE_DEVICES takes)."""
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU id (e.g. 0, or 0,1); put "
                                         "section.key=value overrides before --gpus")
    return text


def run_jobs(jobs: list[tuple[str, list[str], Path]], gpus: list[str], poll_s: float) -> list[str]:
    """Run `(name, command, log file)` jobs, at most one per GPU slot at a time, each pinned to its
    slot with CUDA_VISIBLE_DEVICES; returns the names of the jobs that failed (each logged).
    If this process stops (an error, Ctrl-C), the jobs still running are stopped with it."""
    running: dict = {}
    try:
        return _run(jobs, gpus, poll_s, running)
    finally:
        for proc in running:
            proc.terminate()


def _run(jobs, gpus, poll_s, running) -> list[str]:
    queue, free, failed = list(jobs), list(gpus), []
    while queue or running:
        while queue and free:
            (name, command, logfile), gpu = queue.pop(0), free.pop(0)
            logfile.parent.mkdir(parents=True, exist_ok=True)
            handle = open(logfile, "a")  # noqa: SIM115 (closed when the job ends)
            proc = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu},
                                    stdout=handle, stderr=subprocess.STDOUT)
            running[proc] = (name, gpu, handle, logfile)
            log.info("%s started on GPU slot %r (log %s)", name, gpu, logfile)
        time.sleep(poll_s)
        for proc in [p for p in running if p.poll() is not None]:
            name, gpu, handle, logfile = running.pop(proc)
            handle.close()
            free.append(gpu)
            if proc.returncode:
                failed.append(name)
                log.error("%s failed (exit %d): see %s", name, proc.returncode, logfile)
            else:
                log.info("%s finished", name)
    return sorted(failed)


def train_parallel(cfg: Config, config_path: str | None, overrides: list[str], gpus: list[str],
                   chosen: list[int] | None = None, poll_s: float = 2.0) -> dict:
    """Train the pending folds, one process per fold and at most one per entry of `gpus`, then
    summarise. Each fold's output goes to `<fold>/train.log`; a failed fold is named with its log."""
    folds = pending_folds(cfg, chosen)
    log.info("folds to train: %s on GPU slot(s) %s", folds, gpus)
    jobs = [(f"fold {f}", script_command(TRAIN_SCRIPT, config_path, overrides, "--folds", str(f),
                                         "--no-summary"),
             fold_dir(cfg, f) / "train.log") for f in folds]
    failed = [int(name.split()[1]) for name in run_jobs(jobs, gpus, poll_s)]
    if failed:
        logs = ", ".join(str(fold_dir(cfg, f) / "train.log") for f in failed)
        raise UserError(f"fold(s) {failed} failed; their logs: {logs}. Rerun to resume them")
    return train_all(cfg, chosen)


def infer_parallel(cfg: Config, config_path: str | None, overrides: list[str], gpus: list[str],
                   poll_s: float = 2.0) -> Path:
    """Shard the fold models over `gpus` (round robin), one inference process per shard, then the
    OOF TTA table and the ensemble of exactly the files the shards wrote."""
    trained = trained_config(cfg)
    folds = inferred_folds(cfg, trained)
    shards = [folds[i::len(gpus)] for i in range(min(len(gpus), len(folds)))]
    before = set(read_manifest(cfg.infer.submissions_dir)["n"].dropna().astype(int))
    jobs = [(f"inference of folds {shard}",
             script_command(INFER_SCRIPT, config_path, overrides,
                            f"infer.folds=[{','.join(map(str, shard))}]", "--shard"),
             trained.run_dir / f"infer_shard{i}.log") for i, shard in enumerate(shards)]
    failed = run_jobs(jobs, gpus, poll_s)
    if failed:
        raise UserError(f"{', '.join(failed)} failed; see {trained.run_dir}/infer_shard*.log")
    manifest = read_manifest(cfg.infer.submissions_dir)
    ours = manifest[(manifest["experiment"] == cfg.experiment) & ~manifest["n"].isin(before)]
    return finish_infer(cfg, sorted(int(n) for n in ours["n"]))
