"""Blend submission files: mean of probabilities, rank average, or OOF-fitted weighted rank average.

Members are sorted by path before blending, so the result never depends on the order files
were listed in. Every member must hold the same image ids, once each, with finite targets in
[0, 1]; anything else is refused with an error naming the file.

Weighted blending fits one weight per (experiment, view) group, not per file: a group's files
are its fold models, whose out-of-fold rows are disjoint, so only the group as a whole has an
OOF prediction over the whole training set (`runs/<experiment>/oof_tta.csv`, column
`pred_<view>`, rows of the group's folds). Within a group test predictions are averaged
(mean of probabilities) first; the groups are then blended on ranks with the fitted weights.

The OOF AUC of a mean or rank blend follows the test blend's recipe (`blend_by_model`): per
experiment its views' OOF columns are combined with `infer.average`, then the experiments are
blended by the method, on the OOF rows they all cover. The competition scores 2020 images only, so
`cv_auc` is taken on the 2020 rows where the OOF has them (`cv_auc_rows`), `cv_auc_all` on all.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.config import Config, save_config
from pipeline.errors import UserError
from pipeline.metrics import auc_2020, safe_auc
from pipeline.submissions import MANIFEST_NAME, read_manifest, select_members
from pipeline.submit import check_before_replace
from pipeline.tables import check_binary, check_unique, read_csv, some
from pipeline.tta import combine_views, percentile_ranks

log = logging.getLogger(__name__)

METHODS = ("mean", "rank", "weighted")
OOF_NAME = "oof_tta.csv"
SHOW = 5  # how many differing ids or bad rows an error lists


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown ensemble method {method!r}; valid: {list(METHODS)}")


def _read_member(path: Path) -> pd.Series:
    """One submission as a Series of targets indexed by image_name, validated."""
    df = read_csv(path, ["image_name", "target"])
    check_unique(df, "image_name", path)
    values = pd.to_numeric(df["target"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        lines = [str(i + 2) for i in np.flatnonzero(bad)]
        shown = df.loc[bad, "target"].astype(str).tolist()
        raise UserError(
            f"{path}: column 'target' must hold finite numbers in [0, 1]; {int(bad.sum())} row(s) "
            f"do not, at CSV line(s) {some(lines, SHOW)}: {some(shown, SHOW)}"
        )
    return pd.Series(values, index=df["image_name"].astype(str).to_numpy())


def _id_mismatch(path: Path, first: Path, ids: set, ref: set) -> str:
    missing, extra = sorted(ref - ids), sorted(ids - ref)
    return (
        f"{path}: image ids differ from {first}: {len(missing)} missing ({some(missing, SHOW)}), "
        f"{len(extra)} extra ({some(extra, SHOW)})"
    )


def read_members(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read submission CSVs aligned on image_name: `(ids (N,), preds (M, N))`, ids sorted."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no submission files to ensemble")
    members = [_read_member(p) for p in paths]
    ref = set(members[0].index)
    for path, member in zip(paths[1:], members[1:], strict=True):
        ids = set(member.index)
        if ids != ref:
            raise UserError(_id_mismatch(path, paths[0], ids, ref))
    ids = np.sort(members[0].index.to_numpy(dtype=str))
    return ids, np.stack([m.reindex(ids).to_numpy() for m in members])


def mean_average(preds: np.ndarray) -> np.ndarray:
    """Mean over members of `(M, N)` probabilities."""
    return np.asarray(preds, dtype=np.float64).mean(axis=0)


def rank_average(preds: np.ndarray) -> np.ndarray:
    """Mean over members of each member's percentile ranks (ties averaged, rank / N): in (0, 1]."""
    return percentile_ranks(np.asarray(preds, dtype=np.float64)).mean(axis=0)


def _check_weights(weights: Sequence[float], m: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"need {m} finite non-negative weights with a positive sum, got {list(w)}")
    return w / w.sum()


def weighted_average(preds: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of the members' percentile ranks; weights are normalised to sum to 1."""
    w = _check_weights(weights, len(preds))
    return w @ percentile_ranks(np.asarray(preds, dtype=np.float64))


def _check_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if set(np.unique(y)) != {0, 1}:
        raise UserError(
            f"OOF targets must hold both 0 and 1 to fit weights, found {sorted(set(y))}"
        )
    return y


def fit_weights(oof_preds: np.ndarray, y: np.ndarray, max_rounds: int = 100) -> np.ndarray:
    """Member weights that maximise OOF AUC of the rank blend: non-negative, summing to 1.

    Caruana-style greedy selection with replacement: start from the best single member, then
    keep adding the member that raises the blend's AUC most, until none raises it. Ties go to
    the lower index, so the fit is deterministic; the blend's AUC is never below the best member's.
    """
    y = _check_labels(y)
    ranks = percentile_ranks(np.asarray(oof_preds, dtype=np.float64))
    singles = [roc_auc_score(y, r) for r in ranks]
    counts = np.zeros(len(ranks))
    first = int(np.argmax(singles))
    counts[first], total, best = 1, ranks[first].copy(), singles[first]
    for _ in range(max_rounds):
        # AUC ignores scale, so the running sum stands in for the mean
        scores = [roc_auc_score(y, total + r) for r in ranks]
        pick = int(np.argmax(scores))
        if scores[pick] <= best + 1e-12:
            break
        counts[pick] += 1
        total += ranks[pick]
        best = scores[pick]
    log.info("fitted weights %s: OOF AUC %.5f (best single %.5f)", counts, best, singles[first])
    return counts / counts.sum()


def blend(preds: np.ndarray, method: str, weights: Sequence[float] | None = None) -> np.ndarray:
    """Blend `(M, N)` member predictions by `method` (mean | rank | weighted)."""
    _check_method(method)
    if method == "mean":
        return mean_average(preds)
    if method == "rank":
        return rank_average(preds)
    if weights is None:
        raise UserError("the weighted ensemble needs weights")
    return weighted_average(preds, weights)


def ensemble(
    paths: Sequence[str | Path], method: str = "mean", weights: Sequence[float] | None = None
) -> pd.DataFrame:
    """Blend submission files into one `(image_name, target)` frame, ids sorted.

    Files (and their weights) are sorted by path first, so listing order does not matter.
    """
    _check_method(method)
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))
    if weights is not None:
        weights = _check_weights(weights, len(paths))[order]
    ids, preds = read_members([paths[i] for i in order])
    return pd.DataFrame({"image_name": ids, "target": blend(preds, method, weights)})


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def blend_by_model(members: pd.DataFrame, method: str, view_average: str) -> pd.DataFrame:
    """Views of one fold model are combined first (`view_average`: mean | logit | rank), then the
    models by `method` (mean | rank), so a model with 8 views weighs as much as one with 1."""
    ids, preds = read_members(list(members["path"]))
    keys = members[["experiment", "fold", "checkpoint"]].astype("string").fillna("").agg("/".join, axis=1)
    per_model = [combine_views(_logit(preds[idx]), view_average)
                 for _, idx in sorted(keys.groupby(keys).indices.items())]
    return pd.DataFrame({"image_name": ids, "target": blend(np.stack(per_model), method)})


# --- run_ensemble: members from the manifest, OOF from the run folders -------------------


@dataclass
class Group:
    """The members of one (experiment, view): fold models whose OOF rows are disjoint."""

    experiment: str
    view: str
    folds: list[int]
    paths: list[Path]


def _groups(members: pd.DataFrame) -> list[Group]:
    groups = []
    for (experiment, view), rows in members.groupby(["experiment", "view"], sort=True):
        folds = sorted({int(f) for f in rows["fold"].dropna()})
        groups.append(Group(str(experiment), str(view), folds, [Path(p) for p in rows["path"]]))
    return groups


def group_oof(group: Group, runs_dir: str | Path) -> pd.DataFrame:
    """OOF rows of a group's folds from `runs/<experiment>/oof_tta.csv`: index image_name, columns
    target, source ("" where the file has no source column) and pred."""
    path = Path(runs_dir) / group.experiment / OOF_NAME
    column = f"pred_{group.view}"
    df = read_csv(path, ["image_name", "target", "fold", column])
    folds = pd.to_numeric(df["fold"], errors="coerce")
    df = df[folds.isin(group.folds)]
    if df.empty:
        raise UserError(f"{path}: no rows for fold(s) {group.folds} of view {group.view!r}")
    pred = pd.to_numeric(df[column], errors="coerce")
    if not np.isfinite(pred.to_numpy(dtype=np.float64)).all():
        raise UserError(f"{path}: column {column!r} has missing or non-numeric values")
    target = check_binary(df, "target", path)
    source = df["source"].fillna("").astype(str).to_numpy() if "source" in df else ""
    return pd.DataFrame(
        {"target": target.to_numpy(), "source": source, "pred": pred.to_numpy()},
        index=df["image_name"],
    )


def _align(frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, np.ndarray]:
    """`(rows, preds (F, N))` over the images every frame covers, ids sorted; rows: target, source."""
    common = sorted(set.intersection(*(set(f.index) for f in frames)))
    if not common:
        raise UserError("the groups' OOF predictions share no images; check their folds")
    rows = frames[0][["target", "source"]].reindex(common)
    return rows, np.stack([f["pred"].reindex(common).to_numpy() for f in frames])


def oof_matrix(groups: list[Group], runs_dir: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """`(rows, preds (G, N))` over the OOF images every group covers; rows: target, source by image_name."""
    return _align([group_oof(g, runs_dir) for g in groups])


def model_oof(groups: list[Group], cfg: Config) -> tuple[pd.DataFrame, np.ndarray]:
    """The OOF twin of `blend_by_model`'s models: `(rows, preds (E, N))`, one per experiment.

    An experiment's OOF rows come from disjoint fold models, so combining its views' columns
    row-wise by `infer.average` is what `blend_by_model` does to each fold model's test files.
    """
    frames = []
    for experiment in sorted({g.experiment for g in groups}):
        rows, preds = oof_matrix([g for g in groups if g.experiment == experiment], cfg.runs_dir)
        frames.append(rows.assign(pred=combine_views(_logit(preds), cfg.infer.average)))
    return _align(frames)


def cv_fields(rows: pd.DataFrame, blended: np.ndarray) -> dict:
    """AUC of OOF `blended` scores: `cv_auc` on the 2020 rows where some hold both classes (the
    rows the leaderboard scores), else on all rows; `cv_auc_rows` says which; `cv_auc_all` all rows."""
    scored = rows.assign(pred=blended)
    auc_all = safe_auc(scored["target"], scored["pred"], "ensemble OOF")
    auc = auc_2020(scored)
    if math.isnan(auc):
        return {"cv_auc": auc_all, "cv_auc_rows": "all", "cv_auc_all": auc_all}
    return {"cv_auc": auc, "cv_auc_rows": "2020", "cv_auc_all": auc_all}


def _oof_cv(groups: list[Group], cfg: Config) -> dict | None:
    """CV fields of the mean or rank blend on OOF, if every group has OOF predictions, else None (logged)."""
    try:
        rows, preds = model_oof(groups, cfg)
        _check_labels(rows["target"].to_numpy())
    except UserError as err:
        log.warning("no OOF AUC for the ensemble: %s", err)
        return None
    return cv_fields(rows, blend(preds, cfg.ensemble.method))


def _manifest_cv(members: pd.DataFrame) -> dict:
    """The members' mean manifest cv_auc (rows unknown), or None."""
    aucs = members["cv_auc"].dropna()
    auc = float(aucs.mean()) if len(aucs) else None
    return {"cv_auc": auc, "cv_auc_rows": None, "cv_auc_all": None}


def _describe_filters(cfg: Config) -> str:
    e = cfg.ensemble
    return (
        f"experiments={list(e.experiments)}, folds={list(e.folds)}, views={list(e.views)}, "
        f"n_min={e.n_min}, n_max={e.n_max}, numbers={list(e.numbers)}"
    )


def _select(cfg: Config) -> pd.DataFrame:
    folder = Path(cfg.infer.submissions_dir)
    manifest = read_manifest(folder)
    e = cfg.ensemble
    if manifest.empty:
        raise UserError(f"no submissions recorded in {folder / MANIFEST_NAME}; run inference first")
    members = select_members(manifest, e.experiments, e.folds, e.views, e.n_min, e.n_max, e.numbers)
    if members.empty:
        raise UserError(
            f"no submissions in {folder / MANIFEST_NAME} ({len(manifest)} recorded) match the "
            f"ensemble filters {_describe_filters(cfg)}"
        )
    members["path"] = [str(folder / f) for f in members["file"]]
    return members.sort_values("path", kind="stable").reset_index(drop=True)


def _blend_groups(groups: list[Group], cfg: Config) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Weighted blend: fit group weights on OOF, blend group-mean test predictions."""
    rows, oof = oof_matrix(groups, cfg.runs_dir)
    weights = fit_weights(oof, rows["target"].to_numpy())
    paths = [p for g in groups for p in g.paths]
    ids, preds = read_members(paths)
    sizes = np.cumsum([0] + [len(g.paths) for g in groups])
    group_preds = np.stack(
        [preds[a:b].mean(axis=0) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    )
    df = pd.DataFrame({"image_name": ids, "target": weighted_average(group_preds, weights)})
    return df, weights, cv_fields(rows, weighted_average(oof, weights))


def _summary(
    method: str, groups: list[Group], group_weights: np.ndarray, cv: dict, source: str
) -> dict:
    """What ensemble.json records; a group's weight is split evenly among its files."""
    file_weights = {
        str(p): float(w) / len(g.paths)
        for g, w in zip(groups, group_weights, strict=True)
        for p in g.paths
    }
    files = sorted(file_weights)
    return {
        "method": method,
        "files": files,
        "weights": [file_weights[f] for f in files],
        **cv,
        "cv_auc_source": source if cv["cv_auc"] is not None else None,
        "groups": [
            {
                "experiment": g.experiment,
                "view": g.view,
                "folds": g.folds,
                "files": [str(p) for p in g.paths],
                "weight": float(w),
            }
            for g, w in zip(groups, group_weights, strict=True)
        ],
    }


def run_ensemble(cfg: Config) -> Path:
    """Blend the manifest's submissions picked by `cfg.ensemble`; write the CSV and a JSON beside it.

    The JSON (`<output stem>.json`) records method, files, per-file weights (a group's weight is
    split evenly among its files), groups, and cv_auc: the blend's OOF AUC where every group has
    OOF predictions (on 2020 rows where there are some: `cv_auc_rows`, `cv_auc_all` on all rows;
    `cv_auc_source` "oof_in_sample" for weighted, whose weights were fitted on those rows), else
    the mean of the members' manifest cv_auc ("manifest_mean"), else null.
    """
    e = cfg.ensemble
    _check_method(e.method)
    members = _select(cfg)
    groups = _groups(members)
    if e.method == "weighted":
        df, group_weights, cv = _blend_groups(groups, cfg)
        source = "oof_in_sample"  # weights fitted on the same OOF rows: optimistic
    else:
        df = blend_by_model(members, e.method, cfg.infer.average)
        # recorded as each group's share of the files
        group_weights = np.array([len(g.paths) for g in groups], dtype=np.float64)
        group_weights /= group_weights.sum()
        cv, source = _oof_cv(groups, cfg), "oof"
        if cv is None:
            cv, source = _manifest_cv(members), "manifest_mean"
    output = Path(e.output)
    with atomic_path(output) as tmp:  # a valid ensemble.csv is never replaced by a failing one
        df.to_csv(tmp, index=False, lineterminator="\n")
        check_before_replace(tmp, output, cfg.data.sample_submission)
    save_config(cfg, output.parent, output.stem + ".config.yaml")
    summary = _summary(e.method, groups, group_weights, cv, source)
    atomic_write_text(output.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    log.info("members: %s", ", ".join(Path(f).name for f in summary["files"]))
    for g in summary["groups"]:
        log.info("group %s/%s: folds %s, %d file(s), weight %.4f",
                 g["experiment"], g["view"], g["folds"], len(g["files"]), g["weight"])
    log.info("wrote %s (%s of %d files, cv_auc %s on %s rows, %s)", output, e.method,
             len(summary["files"]), cv["cv_auc"], cv["cv_auc_rows"], source)
    return output
