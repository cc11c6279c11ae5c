"""ROC AUC over whole prediction sets (never per batch), 2020-only AUC, patient bootstrap intervals."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pipeline.merge import COMPETITION_SOURCE

log = logging.getLogger(__name__)


def safe_auc(y: np.ndarray, p: np.ndarray, what: str = "AUC") -> float:
    """ROC AUC, or NaN with a warning when only one class is present."""
    y, p = np.asarray(y), np.asarray(p)
    if not np.isfinite(p).all():
        log.warning("%s: %d prediction(s) are NaN or infinite; AUC is undefined (NaN)", what,
                    int((~np.isfinite(p)).sum()))
        return math.nan
    if len(np.unique(y)) < 2:
        log.warning("%s: only one class among %d rows; AUC is undefined (NaN)", what, len(y))
        return math.nan
    return float(roc_auc_score(y, p))


def auc_2020(df: pd.DataFrame, pred: str = "pred") -> float:
    """AUC on the competition's own (2020) images only: what the leaderboard measures."""
    part = df[df["source"] == COMPETITION_SOURCE]
    return safe_auc(part["target"], part[pred], "2020-only AUC") if len(part) else math.nan


def patient_bootstrap_ci(df: pd.DataFrame, n: int, seed: int = 0, pred: str = "pred",
                         level: float = 0.95) -> tuple[float, float]:
    """Interval of the AUC when whole patients are resampled (images of a patient are correlated)."""
    if n <= 0:
        return math.nan, math.nan
    codes, _ = pd.factorize(df["patient_id"])
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 1))
    counts = np.bincount(codes)
    y, p = df["target"].to_numpy()[order], df[pred].to_numpy()[order]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n):
        picked = rng.integers(0, len(counts), len(counts))
        rows = np.concatenate([np.arange(starts[g], starts[g] + counts[g]) for g in picked])
        if y[rows].min() != y[rows].max():
            aucs.append(roc_auc_score(y[rows], p[rows]))
    if not aucs:
        return math.nan, math.nan
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _mean_finite(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def cv_summary(oof: pd.DataFrame, bootstrap: int, seed: int = 0) -> dict:
    """Per-fold AUC (all rows and 2020 alone), overall OOF AUC, 2020-only AUC and a
    patient-bootstrap 95% interval."""
    per_fold = {int(f): safe_auc(g["target"], g["pred"], f"fold {f}") for f, g in oof.groupby("fold")}
    per_fold_2020 = {int(f): auc_2020(g) for f, g in oof.groupby("fold")}
    lo, hi = patient_bootstrap_ci(oof, bootstrap, seed)
    part = oof[oof["source"] == COMPETITION_SOURCE]
    ci_2020 = [lo, hi] if len(part) == len(oof) else list(patient_bootstrap_ci(part, bootstrap, seed))
    return {
        "folds": per_fold,
        "folds_2020": per_fold_2020,
        "mean_fold_auc": _mean_finite(per_fold.values()),
        "mean_fold_auc_2020": _mean_finite(per_fold_2020.values()),
        "oof_auc": safe_auc(oof["target"], oof["pred"], "OOF"),
        "oof_auc_2020": auc_2020(oof),
        "oof_auc_ci95": [lo, hi],
        "oof_auc_2020_ci95": ci_2020,
        "n_images": int(len(oof)),
        "n_positives": int(oof["target"].sum()),
    }
