"""Stratified, patient-grouped, size-balanced cross-validation folds ("triple stratified").

No patient is in two folds; each fold gets the same share of positives and of images, and a
similar mix of small and large patients. Groups are placed largest-first, each into the fold
that needs it most, which balances far better than random group splits on a set where a few
patients hold 100+ images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_write_csv
from pipeline.cli import UserError
from pipeline.config import Config, FoldsConfig, save_config
from pipeline.merge import COMPETITION_SOURCE, fill_patients, merge_tables

log = logging.getLogger(__name__)

TRAIN_ONLY = -1


def group_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Images and positives per patient group."""
    return df.groupby("patient_id", sort=True).agg(
        images=("target", "size"), positives=("target", "sum")
    )


def _placement_order(stats: pd.DataFrame, seed: int) -> np.ndarray:
    """Groups with most positives first, then largest; ties in a seeded random order."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(stats))
    keys = stats.iloc[shuffled]
    order = np.lexsort((-keys["images"].to_numpy(), -keys["positives"].to_numpy()))
    return shuffled[order]


def assign_groups(stats: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Fold of each group: positive groups go where positives are fewest, the rest where images are."""
    images = stats["images"].to_numpy()
    positives = stats["positives"].to_numpy()
    fold_images = np.zeros(n_folds)
    fold_pos = np.zeros(n_folds)
    fold_groups = np.zeros(n_folds)
    folds = np.empty(len(stats), dtype=np.int64)
    for i in _placement_order(stats, seed):
        if positives[i] > 0:
            need = fold_pos * 1e6 + fold_images * 1e-3 + fold_groups * 1e-9
        else:
            need = fold_images * 1e3 + fold_groups * 1e-6
        f = int(np.argmin(need))
        folds[i] = f
        fold_images[f] += images[i]
        fold_pos[f] += positives[i]
        fold_groups[f] += 1
    return pd.Series(folds, index=stats.index, name="fold")


def _check_feasible(stats: pd.DataFrame, n_folds: int) -> None:
    if n_folds < 2:
        raise UserError(f"folds.n_folds must be at least 2, got {n_folds}")
    pos_groups = int((stats["positives"] > 0).sum())
    if pos_groups < n_folds:
        raise UserError(
            f"folds.n_folds={n_folds} but only {pos_groups} patient(s) have a positive image: "
            "some folds would have no positive to validate on; lower folds.n_folds"
        )
    total = stats["positives"].sum()
    top = stats["positives"].max()
    if top > total / n_folds * 1.5:
        log.warning(
            "one patient holds %d of %d positives: the fold holding it will have a higher "
            "positive rate than the others", top, total,
        )


def make_folds(df: pd.DataFrame, cfg: FoldsConfig) -> pd.DataFrame:
    """Add a `fold` column; external images are train-only (-1) or spread over folds, by config."""
    if cfg.external not in ("train_only", "spread"):
        raise UserError(f"folds.external must be 'train_only' or 'spread', got {cfg.external!r}")
    df = df.assign(patient_id=fill_patients(df["patient_id"], df["image_name"], "folds input"))
    in_cv = (df["source"] == COMPETITION_SOURCE) | (cfg.external == "spread")
    stats = group_stats(df[in_cv])
    _check_feasible(stats, cfg.n_folds)
    group_fold = assign_groups(stats, cfg.n_folds, cfg.seed)
    out = df.copy()
    out["fold"] = df["patient_id"].map(group_fold).where(in_cv, TRAIN_ONLY).astype("int64")
    return out


def audit(df: pd.DataFrame) -> pd.DataFrame:
    """Per fold: images, patients, positives, positive rate (%), and images per source."""
    table = df.groupby("fold").agg(
        images=("target", "size"),
        patients=("patient_id", "nunique"),
        positives=("target", "sum"),
    )
    table["pos_rate_%"] = (100 * table["positives"] / table["images"]).round(3)
    table["median_pt_size"] = df.groupby(["fold", "patient_id"]).size().groupby("fold").median()
    by_source = df.groupby(["fold", "source"]).size().unstack(fill_value=0)
    return table.join(by_source.add_prefix("n_"))


def check_folds(df: pd.DataFrame) -> None:
    """Raise if any patient lies in two folds (a leak that would inflate CV)."""
    per_patient = df.groupby("patient_id")["fold"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise AssertionError(f"{len(leaked)} patient(s) in several folds: {list(leaked.index[:10])}")


def run_folds(cfg: Config) -> pd.DataFrame:
    """The `make folds` stage: merge the inputs, split, write `folds.csv` and its config, log the audit."""
    df = make_folds(merge_tables(cfg.data), cfg.folds)
    check_folds(df)
    out = Path(cfg.folds.output)
    atomic_write_csv(df, out)
    save_config(cfg, out.parent, out.stem + ".config.yaml")
    log.info("wrote %s (%d images, %d folds)\n%s", out, len(df), cfg.folds.n_folds,
             audit(df).to_string())
    return df
