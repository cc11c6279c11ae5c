"""One model per fold: restartable fits, best checkpoint by validation AUC, out-of-fold predictions, CV."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from scipy.special import expit

from pipeline.atomic import NO_ROOM, atomic_path, atomic_write_csv, atomic_write_text, no_room_error
from pipeline.config import (
    Config,
    changed_folds_settings,
    changed_settings,
    load_config,
    save_config,
)
from pipeline.data import FoldDataModule, frame_loader, split_fold
from pipeline.errors import UserError
from pipeline.metrics import cv_summary
from pipeline.model import MONITORS, MelanomaModel, load_model, read_checkpoint
from pipeline.predict import default_device, predict_logits

log = logging.getLogger(__name__)

OOF_COLUMNS = ["image_name", "patient_id", "source", "target", "pred", "fold", "checkpoint"]


def fold_dir(cfg: Config, fold: int) -> Path:
    return cfg.run_dir / f"fold{fold}"


def read_folds(cfg: Config) -> pd.DataFrame:
    """The folds table, refused if the config saved beside it made it from other inputs or split."""
    path = Path(cfg.folds.output)
    if not path.is_file():
        raise UserError(f"{path}: folds file not found; run `make folds` first")
    saved = path.with_name(path.stem + ".config.yaml")
    if saved.is_file():
        changed = changed_folds_settings(load_config(saved), cfg)
        if changed:
            raise UserError(f"{path} was made from other data or fold settings ({saved}): "
                            f"{'; '.join(changed[:5])}. Run `make folds` with this config, or give "
                            "this experiment its own file (make ... FOLDS_CSV=folds/<name>.csv)")
    return pd.read_csv(path, dtype={"image_name": "string", "patient_id": "string"})


def resolve_precision(setting: str) -> str:
    """`auto`: 16-bit mixed precision on CUDA, full 32-bit on the CPU (bf16 is slow on most CPUs)."""
    if setting != "auto":
        return setting
    return "16-mixed" if torch.cuda.is_available() else "32-true"


def batch_limit(name: str, value: object) -> int | float | None:
    """Lightning's `limit_*_batches`: an int is a number of batches (0: none), a float in (0, 1] a share."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"train.{name} must be a number, got {value!r}")
    if isinstance(value, int) and value < 0 or isinstance(value, float) and not 0 < value <= 1:
        raise UserError(f"train.{name}={value!r}: give a number of batches (an integer >= 0) or a "
                        "share of them (a float in (0, 1], e.g. 1.0 for all)")
    return value


def check_monitor(monitor: str) -> str:
    if monitor not in MONITORS:
        raise UserError(f"train.monitor must be one of {list(MONITORS)}, got {monitor!r}")
    return monitor


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name in their own folder and renamed when whole:
    a kill or a full disk mid-save never leaves a torn last.ckpt (Lightning's own save goes
    through the system temp folder and is a plain copy when that is another device)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()  # serialised first (as Lightning does): a write error is an OSError
        torch.save(checkpoint, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())


def build_trainer(cfg: Config, out: Path, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    t = cfg.train
    monitor = check_monitor(t.monitor)
    best = ModelCheckpoint(
        dirpath=out, filename="best", monitor=monitor, mode="max", save_top_k=1,
        enable_version_counter=False, auto_insert_metric_name=False,
    )
    # every epoch, whatever the monitor says: Lightning's save_last writes only with a new best
    last = ModelCheckpoint(dirpath=out, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False, auto_insert_metric_name=False)
    extra = [best, last, LearningRateMonitor(logging_interval="step"), *callbacks]
    if t.checkpoint_every_minutes:  # a killed fold then loses minutes, not a whole long epoch
        extra.insert(2, ModelCheckpoint(
            dirpath=out, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
            train_time_interval=timedelta(minutes=t.checkpoint_every_minutes)))
    if t.early_stopping_patience:
        extra.append(EarlyStopping(monitor, mode="max", patience=t.early_stopping_patience,
                                   check_finite=False))
    limits = {k: batch_limit(k, getattr(t, k)) for k in ("limit_train_batches", "limit_val_batches")
              if getattr(t, k) is not None}
    return pl.Trainer(
        default_root_dir=out, max_epochs=t.epochs, precision=resolve_precision(t.precision),
        accelerator=t.accelerator, devices=t.devices,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
        callbacks=extra, logger=[CSVLogger(out, name="csv"), TensorBoardLogger(out, name="tb")],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=t.log_every_n_steps, enable_model_summary=False, enable_progress_bar=t.progress_bar,
        **limits,
    )


def predict_oof(cfg: Config, valid: pd.DataFrame, checkpoint: Path, fold: int) -> pd.DataFrame:
    """Predictions of `checkpoint` on its fold's validation images, one row per image."""
    model = load_model(str(checkpoint), cfg.model)
    loader = frame_loader(valid, cfg.data, default_device(), cfg.infer.batch_size, model=cfg.model,
                          where=f"fold {fold} validation")
    index, logits = predict_logits([model], loader, ["identity"], desc=f"oof fold {fold}",
                                   progress=cfg.train.progress_bar)
    pred = np.full(len(valid), np.nan)
    pred[index] = expit(logits[0, 0])
    return valid.assign(pred=pred, checkpoint=checkpoint.stem)[OOF_COLUMNS]


def scored_checkpoint(out: Path, which: str) -> Path:
    """The checkpoint inference will use (`infer.checkpoint`: best | last), so the CV scores it."""
    path = out / f"{which}.ckpt"
    if path.is_file():
        return path
    log.warning("%s: no %s.ckpt (validation AUC never finite); using last.ckpt", out, which)
    return out / "last.ckpt"


def resume_checkpoint(out: Path) -> Path:
    """The newest of last.ckpt and the checkpoints Lightning saves when SLURM preempts a job
    (`hpc_ckpt_<n>.ckpt`); last.ckpt's path when there is none."""
    found = [p for p in [out / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else out / "last.ckpt"


def summarize_finished(cfg: Config) -> dict:
    """The run's OOF and cv.json from every finished fold (the job after a SLURM array)."""
    folds = read_folds(cfg)
    done = [f for f in sorted(int(f) for f in set(folds["fold"]) if f >= 0)
            if (fold_dir(cfg, f) / "oof.csv").is_file()]
    if not done:
        raise UserError(f"no finished fold under {cfg.run_dir}: nothing to summarise")
    return summarize(cfg, [pd.read_csv(fold_dir(cfg, f) / "oof.csv") for f in done])


def score_fold(cfg: Config, fold: int, valid: pd.DataFrame) -> pd.DataFrame:
    """Predict the fold's validation images with the checkpoint inference uses; write its oof.csv."""
    out = fold_dir(cfg, fold)
    oof = predict_oof(cfg, valid, scored_checkpoint(out, cfg.infer.checkpoint), fold)
    atomic_write_csv(oof, out / "oof.csv")
    return oof


def train_fold(cfg: Config, fold: int, folds: pd.DataFrame | None = None,
               callbacks: Sequence[Callback] = ()) -> pd.DataFrame | None:
    """Fit fold `fold` (resuming from last.ckpt if a run was killed) and write its oof.csv.
    Under DDP every rank trains and only rank 0 predicts the OOF (the others return None).

    A fold whose oof.csv exists is finished and skipped; if that OOF scored another checkpoint
    than `infer.checkpoint`, the fold is scored again (no refit).
    """
    out = fold_dir(cfg, fold)
    folds = read_folds(cfg) if folds is None else folds
    if (out / "oof.csv").is_file():
        oof = pd.read_csv(out / "oof.csv")
        scored = set(oof["checkpoint"]) if "checkpoint" in oof else {"best"}
        if scored == {cfg.infer.checkpoint}:
            log.info("fold %d: finished earlier (%s), skipped", fold, out / "oof.csv")
            return oof
        log.info("fold %d: finished earlier; its OOF scored %s, scoring %s.ckpt", fold,
                 sorted(scored), cfg.infer.checkpoint)
        return score_fold(cfg, fold, split_fold(folds, fold).valid)
    split = split_fold(folds, fold)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.devices != 1:  # DDP: every rank runs this; the launcher owns the processes
        return _fit_fold(cfg, fold, split, callbacks)
    with fold_lock(out):
        return _fit_fold(cfg, fold, split, callbacks)


@contextmanager
def fold_lock(out: Path) -> Iterator[None]:
    """One trainer per fold folder: a second process (a rerun while the first still runs) is refused."""
    with open(out / ".train.lock", "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being trained by another process; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fit_fold(cfg: Config, fold: int, split, callbacks: Sequence[Callback]) -> pd.DataFrame | None:
    out = fold_dir(cfg, fold)
    pl.seed_everything(cfg.train.seed + fold, workers=True, verbose=False)
    model = MelanomaModel.from_configs(cfg.model, cfg.train, fold)
    resume = resume_checkpoint(out)
    if resume.is_file():
        read_checkpoint(str(resume))  # a damaged one is named here, not deep inside Lightning
        log.info("fold %d: resuming from %s", fold, resume)
    trainer = build_trainer(cfg, out, callbacks)
    data = FoldDataModule(cfg, split, seed=cfg.train.seed + fold)
    # the configs are written once training really starts: a failed start leaves nothing behind
    save_config(cfg, cfg.run_dir)
    save_config(cfg, out)
    try:
        trainer.fit(model, data, ckpt_path=resume if resume.is_file() else None)
        if not trainer.is_global_zero:  # under DDP the OOF and the summary are rank 0's
            return None
    except OSError as err:
        if err.errno in NO_ROOM:
            where = Path(err.filename) if err.filename else out
            raise no_room_error(err, where, f"fold {fold} resumes from its last whole checkpoint") from None
        raise
    if model.skipped:
        log.warning("fold %d: %d unreadable image(s) were skipped", fold, model.skipped)
    return score_fold(cfg, fold, split.valid)


def summarize(cfg: Config, oofs: list[pd.DataFrame]) -> dict:
    """Write the run's oof.csv and cv.json; log the per-fold and overall table."""
    oof = pd.concat(oofs, ignore_index=True)
    missing = oof["pred"].isna()
    if missing.any():
        log.warning("%d OOF row(s) without a prediction (skipped images) left out of the CV", int(missing.sum()))
    scored = oof[~missing]
    summary = cv_summary(scored, cfg.train.bootstrap, cfg.train.seed)
    checkpoints = sorted(set(oof["checkpoint"])) if "checkpoint" in oof else ["best"]
    summary.update(monitor=cfg.train.monitor, checkpoint="/".join(checkpoints))
    summary.update(headline_cv(summary))
    atomic_write_csv(oof, cfg.run_dir / "oof.csv")
    atomic_write_text(cfg.run_dir / "cv.json", json.dumps(summary, indent=2) + "\n")
    log.info("CV of %s\n%s", cfg.experiment, format_cv_table(scored, summary))
    return summary


def headline_cv(summary: dict) -> dict:
    """The CV to quote: the 2020-only OOF AUC (the competition scores 2020 images only), or the
    AUC over every OOF row where no 2020 row was scored."""
    metric = "oof_auc" if math.isnan(summary["oof_auc_2020"]) else "oof_auc_2020"
    return {"cv_auc": summary[metric], "cv_auc_metric": metric}


def format_cv_table(oof: pd.DataFrame, summary: dict) -> str:
    rows = [f"{'fold':>6} {'images':>7} {'pos':>5} {'AUC':>7} {'AUC 2020':>9}"]
    for fold, group in oof.groupby("fold"):
        rows.append(f"{fold:>6} {len(group):>7} {int(group['target'].sum()):>5} "
                    f"{summary['folds'][int(fold)]:>7.4f} {summary['folds_2020'][int(fold)]:>9.4f}")
    lo, hi = summary["oof_auc_ci95"]
    rows.append(f"{'OOF':>6} {len(oof):>7} {summary['n_positives']:>5} {summary['oof_auc']:>7.4f} "
                f"{summary['oof_auc_2020']:>9.4f}   95% CI (patient bootstrap) [{lo:.4f}, {hi:.4f}]")
    rows.append(f"checkpoints ({summary['checkpoint']}.ckpt) chosen by {summary['monitor']}; "
                f"CV = {summary['cv_auc_metric']} = {summary['cv_auc']:.4f}")
    return "\n".join(rows)


def check_same_training(cfg: Config) -> None:
    """Refuse to add to or resume a run whose models were trained with other settings: resumed
    schedules would not fit (OneCycle's length), and inference reads the run's saved config.
    A saved config with nothing trained under it (a start that failed) does not count."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return
    trained = sorted(cfg.run_dir.glob("fold*/*.ckpt")) + sorted(cfg.run_dir.glob("fold*/oof.csv"))
    changed = changed_settings(load_config(path), cfg)
    if changed and not trained:
        log.info("%s: nothing was trained with its settings yet; replacing it", path)
    elif changed:
        raise UserError(
            f"experiment {cfg.experiment!r} was trained with other settings ({path}; e.g. "
            f"{trained[0]}): {'; '.join(changed[:10])}. Use a new name (experiment=...) or remove "
            f"{cfg.run_dir}"
        )


def train_all(cfg: Config, folds_to_train: Sequence[int] | None = None, summary: bool = True) -> dict:
    """Train the chosen folds (default all), then summarise every finished fold of the run
    (`summary=False`: a fold process of a parallel run, whose parent summarises once)."""
    folds = read_folds(cfg)
    all_folds = sorted(int(f) for f in set(folds["fold"]) if f >= 0)
    chosen = list(folds_to_train) if folds_to_train else all_folds
    unknown = sorted(set(chosen) - set(all_folds))
    if unknown:
        raise UserError(f"fold(s) {unknown} not in {cfg.folds.output} (folds: {all_folds})")
    check_same_training(cfg)
    results = [train_fold(cfg, fold, folds) for fold in chosen]
    if not summary or any(r is None for r in results):  # rank 0 / the parent summarises
        return {}
    done = [f for f in all_folds if (fold_dir(cfg, f) / "oof.csv").is_file()]
    pending = sorted(set(all_folds) - set(done))
    if pending:
        log.info("folds still to train: %s", pending)
    return summarize(cfg, [pd.read_csv(fold_dir(cfg, f) / "oof.csv") for f in done])
