"""Stratified, patient-grouped, size-balanced cross-validation folds ("triple stratified").

No patient (or external lesion) is in two folds. Each fold gets the same number of patients of
each size (1-10, 11-20, 21-30, 31-50, 51-80, 81+ images), to one patient, by dealing each size
bin in rounds; swaps of two same-size-bin patients between two folds then even out images and
positives, which keeps those counts exact. The 2020 images and the external images are split
each on their own, so the 2020 folds alone are as balanced as the whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_write_csv
from pipeline.config import Config, FoldsConfig, save_config
from pipeline.errors import UserError
from pipeline.merge import COMPETITION_SOURCE, fill_patients, merge_tables

log = logging.getLogger(__name__)

TRAIN_ONLY = -1
SIZE_EDGES = [0, 10, 20, 30, 50, 80, np.inf]
SIZE_BINS = ["1-10", "11-20", "21-30", "31-50", "51-80", "81+"]
MIN_GROUPED = 0.95  # spread mode needs lesion groups for this share of each external set
POSITIVE_WEIGHT = 1e4  # one positive out of balance costs more than any image imbalance


def group_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Images, positives and size bin per patient group."""
    stats = df.groupby("patient_id", sort=True).agg(
        images=("target", "size"), positives=("target", "sum")
    )
    stats["size_bin"] = size_bins(stats["images"])
    return stats


def size_bins(images: pd.Series) -> pd.Series:
    return pd.cut(images, SIZE_EDGES, labels=SIZE_BINS)


def _deal(stats: pd.DataFrame, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Each size bin dealt in rounds of one group per fold, most positives and largest first;
    a bin's last, partial round goes to the folds with fewest groups so far."""
    images, positives = stats["images"].to_numpy(), stats["positives"].to_numpy()
    fold_images, fold_pos, fold_groups = np.zeros(n_folds), np.zeros(n_folds), np.zeros(n_folds)
    folds = np.empty(len(stats), np.int64)
    codes = stats["size_bin"].cat.codes.to_numpy()
    tie = rng.permutation(n_folds)  # ties go to a seeded fold order, so seeds give unrelated folds
    for b in np.unique(codes)[::-1]:
        members = np.flatnonzero(codes == b)
        members = members[rng.permutation(len(members))]
        members = members[np.lexsort((-images[members], -positives[members]))]
        for start in range(0, len(members), n_folds):
            batch = members[start:start + n_folds]
            free = list(range(n_folds))
            if len(batch) < n_folds:  # the partial round: folds with fewest groups, random ties
                order = np.lexsort((rng.random(n_folds), fold_images, fold_groups))
                free = sorted(order[:len(batch)].tolist())
            for i in batch:
                need = fold_pos * POSITIVE_WEIGHT + fold_images if positives[i] else fold_images
                f = min(free, key=lambda k: (need[k], tie[k]))
                free.remove(f)
                folds[i] = f
                fold_images[f] += images[i]
                fold_pos[f] += positives[i]
                fold_groups[f] += 1
    return folds


def _best_swap(a_sig: np.ndarray, b_sig: np.ndarray, gap: np.ndarray) -> tuple[float, int, int]:
    """The swap of one group of signature a_sig[i] (fold a) for one of b_sig[j] (fold b) that
    lowers the balance cost most: (change of cost, i, j). `gap` is fold a minus fold b in
    (images, positives); the cost is the sum of squared deviations, positives weighted."""
    d = b_sig[None, :, :] - a_sig[:, None, :]  # what fold a gains
    weight = np.array([1.0, POSITIVE_WEIGHT])
    delta = (d * gap + d ** 2) @ weight
    i, j = np.unravel_index(np.argmin(delta), delta.shape)
    return float(delta[i, j]), int(i), int(j)


def _refine(stats: pd.DataFrame, folds: np.ndarray, n_folds: int, rng: np.random.Generator,
            max_passes: int = 200) -> np.ndarray:
    """Swap same-bin groups between folds while that evens out images and positives; group
    counts per fold and bin never change."""
    sig = stats[["images", "positives"]].to_numpy(np.float64)
    codes = stats["size_bin"].cat.codes.to_numpy()
    totals = np.stack([np.bincount(folds, sig[:, k], n_folds) for k in range(2)], axis=1)
    for _ in range(max_passes):
        improved = False
        for a in range(n_folds):
            for b in range(a + 1, n_folds):
                for code in np.unique(codes):
                    in_a = np.flatnonzero((folds == a) & (codes == code))
                    in_b = np.flatnonzero((folds == b) & (codes == code))
                    if not len(in_a) or not len(in_b):
                        continue
                    ua, ia = np.unique(sig[in_a], axis=0, return_inverse=True)
                    ub, ib = np.unique(sig[in_b], axis=0, return_inverse=True)
                    delta, i, j = _best_swap(ua, ub, totals[a] - totals[b])
                    if delta >= -1e-9:
                        continue
                    ga = rng.choice(in_a[ia.ravel() == i])
                    gb = rng.choice(in_b[ib.ravel() == j])
                    folds[ga], folds[gb] = b, a
                    totals[a] += sig[gb] - sig[ga]
                    totals[b] += sig[ga] - sig[gb]
                    improved = True
        if not improved:
            break
    return folds


def assign_groups(stats: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Fold of each group: equal groups per size bin and fold, then images and positives evened out."""
    rng = np.random.default_rng(seed)
    folds = _refine(stats, _deal(stats, n_folds, rng), n_folds, rng)
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


def check_spread_grouping(df: pd.DataFrame) -> None:
    """Spread mode puts external images in validation folds: refuse it unless nearly every
    external image's lesion grouping is known (else a lesion's images straddle folds)."""
    external = df[df["source"] != COMPETITION_SOURCE]
    known = external["group_known"] if "group_known" in external else pd.Series(False, external.index)
    for source, share in known.astype(bool).groupby(external["source"]).mean().items():
        if share < MIN_GROUPED:
            raise UserError(
                f"folds.external=spread: only {share:.1%} of the {source!r} images have a known lesion "
                f"grouping (at least {MIN_GROUPED:.0%} needed), so images of one lesion would land in "
                "several folds and inflate the CV. Set data.external[].lesions_csv to ISIC's "
                "ISIC_2019_Training_Metadata.csv (columns image, lesion_id), or use "
                "folds.external=train_only"
            )


def _split_part(df: pd.DataFrame, cfg: FoldsConfig) -> pd.Series:
    """Fold of each patient group of one part (2020, or the external sets together)."""
    stats = group_stats(df)
    _check_feasible(stats, cfg.n_folds)
    return assign_groups(stats, cfg.n_folds, cfg.seed)


def make_folds(df: pd.DataFrame, cfg: FoldsConfig) -> pd.DataFrame:
    """Add a `fold` column; external images are train-only (-1) or spread over folds, by config.

    In spread mode the 2020 images and the external images are balanced each on their own.
    """
    if cfg.external not in ("train_only", "spread"):
        raise UserError(f"folds.external must be 'train_only' or 'spread', got {cfg.external!r}")
    df = df.assign(patient_id=fill_patients(df["patient_id"], df["image_name"], "folds input"))
    is_2020 = df["source"] == COMPETITION_SOURCE
    group_fold = _split_part(df[is_2020], cfg)
    if cfg.external == "spread" and (~is_2020).any():
        check_spread_grouping(df)
        group_fold = pd.concat([group_fold, _split_part(df[~is_2020], cfg)])
    out = df.copy()
    out["fold"] = df["patient_id"].map(group_fold).fillna(TRAIN_ONLY).astype("int64")
    return out


def audit(df: pd.DataFrame) -> pd.DataFrame:
    """Per fold: images, patients, positives, positive rate (%), patients per size bin, and
    images per source."""
    table = df.groupby("fold").agg(
        images=("target", "size"),
        patients=("patient_id", "nunique"),
        positives=("target", "sum"),
    )
    table["pos_rate_%"] = (100 * table["positives"] / table["images"]).round(3)
    table["median_pt_size"] = df.groupby(["fold", "patient_id"]).size().groupby("fold").median()
    patients = df.groupby(["fold", "patient_id"]).size().rename("images").reset_index()
    bins = pd.crosstab(patients["fold"], size_bins(patients["images"])).reindex(
        columns=SIZE_BINS, fill_value=0)
    by_source = df.groupby(["fold", "source"]).size().unstack(fill_value=0)
    return table.join(bins.add_prefix("pt_")).join(by_source.add_prefix("n_"))


def balance(df: pd.DataFrame) -> dict[str, float]:
    """Spreads across the validation folds (fold >= 0): images (% of the mean), positive rate
    (percentage points), patients (count), and per size bin the patient-count spread (% of the
    bin's mean) with the smallest spread integer counts allow (`floor_`)."""
    a = audit(df[df["fold"] >= 0])
    spread = lambda col: float(a[col].max() - a[col].min())  # noqa: E731
    out = {
        "image_spread_%": 100 * spread("images") / a["images"].mean(),
        "pos_rate_spread_pp": float((100 * a["positives"] / a["images"]).pipe(
            lambda r: r.max() - r.min())),
        "patient_spread": spread("patients"),
    }
    for b in SIZE_BINS:
        counts = a[f"pt_{b}"]
        if counts.sum():
            out[f"bin_{b}_spread_%"] = 100 * spread(f"pt_{b}") / counts.mean()
            out[f"bin_{b}_floor_%"] = 100 * float(counts.sum() % len(a) != 0) / counts.mean()
    return out


def describe(df: pd.DataFrame) -> str:
    """The audit table and its spreads, for all rows and, where other sources are present, 2020 alone."""
    parts = [("all rows", df)]
    if (df["source"] != COMPETITION_SOURCE).any():
        parts.append(("2020 images alone", df[df["source"] == COMPETITION_SOURCE]))
    text = []
    for title, part in parts:
        spreads = ", ".join(f"{k} {v:.3f}" for k, v in balance(part).items())
        text.append(f"{title}:\n{audit(part).to_string()}\nspreads: {spreads}")
    return "\n".join(text)


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
    log.info("wrote %s (%d images, %d folds)\n%s", out, len(df), cfg.folds.n_folds, describe(df))
    return df
