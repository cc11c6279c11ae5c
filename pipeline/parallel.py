"""Folds in parallel on one machine: each fold its own `scripts/train.py` process, pinned to one
GPU (CUDA_VISIBLE_DEVICES), at most one fold per GPU at a time; the CV summary once all are done.

A fold is finished when its `oof.csv` exists (the marker `train_fold` leaves), so a rerun starts
only the folds still missing, and a killed fold resumes from its last.ckpt as in a serial run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.train import fold_dir, read_folds, train_all

log = logging.getLogger(__name__)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


def fold_command(config_path: str | None, overrides: list[str], fold: int) -> list[str]:
    """The command line that trains one fold, as `make train FOLD=k` runs it."""
    config = ["--config", config_path] if config_path else []
    return [sys.executable, str(TRAIN_SCRIPT), *config, *overrides, "--folds", str(fold)]


def pending_folds(cfg: Config, chosen: list[int] | None) -> list[int]:
    all_folds = sorted(int(f) for f in set(read_folds(cfg)["fold"]) if f >= 0)
    folds = chosen or all_folds
    return [f for f in folds if not (fold_dir(cfg, f) / "oof.csv").is_file()]


def train_parallel(cfg: Config, config_path: str | None, overrides: list[str], gpus: list[str],
                   chosen: list[int] | None = None, poll_s: float = 2.0) -> dict:
    """Train the pending folds, one process per fold and at most one per entry of `gpus`, then
    summarise. Each fold's output goes to `<fold>/train.log`; a failed fold is named with its log."""
    queue = pending_folds(cfg, chosen)
    log.info("folds to train: %s on GPU slot(s) %s", queue, gpus)
    free, running, failed = list(gpus), {}, []
    while queue or running:
        while queue and free:
            fold, gpu = queue.pop(0), free.pop(0)
            out = fold_dir(cfg, fold)
            out.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            logfile = open(out / "train.log", "a")  # noqa: SIM115 (closed when the fold ends)
            proc = subprocess.Popen(fold_command(config_path, overrides, fold), env=env,
                                    stdout=logfile, stderr=subprocess.STDOUT)
            running[proc] = (fold, gpu, logfile)
            log.info("fold %d started on GPU slot %r (log %s)", fold, gpu, out / "train.log")
        time.sleep(poll_s)
        for proc in [p for p in running if p.poll() is not None]:
            fold, gpu, logfile = running.pop(proc)
            logfile.close()
            free.append(gpu)
            if proc.returncode:
                failed.append(fold)
                log.error("fold %d failed (exit %d): see %s", fold, proc.returncode,
                          fold_dir(cfg, fold) / "train.log")
            else:
                log.info("fold %d finished", fold)
    if failed:
        failed.sort()
        logs = ", ".join(str(fold_dir(cfg, f) / "train.log") for f in failed)
        raise UserError(f"fold(s) {failed} failed; their logs: {logs}. Rerun to resume them")
    return train_all(cfg, chosen)
