"""`make experiments`: every experiment under `runs_dir` in one table: its CV, TTA gain, the
settings that tell runs apart, where it came from and its Kaggle scores. Printed, and written to
`<runs_dir>/experiments.csv` (full precision) and `experiments.html` (4 decimals).

An experiment is a folder `<runs_dir>/<name>/` holding `config.yaml` (saved when training
starts); other folders (`bench`, `compare`) are skipped and the log names them. Where each
column comes from:

- `cv_auc`: `cv.json` `cv_auc`, the CV quoted (older files: `oof_auc`). `cv_auc_2020`:
  `oof_auc_2020`, with its 95% patient-bootstrap interval `oof_auc_2020_ci95` (older files:
  `oof_auc_ci95`, over all rows). `mean_fold_auc`: the mean per-fold AUC on the rows the CV
  quotes (`mean_fold_auc_2020` when `cv_auc_metric` is `oof_auc_2020`, else `mean_fold_auc`;
  older files: the mean of `folds_2020` or `folds`).
- `tta_gain`: `tta_oof.json`, `oof_auc.tta - oof_auc.identity`.
- `backbone`, `image_size`, `crop_size`, `epochs`, `target`, `metadata`: the run's saved
  `config.yaml` (`model.backbone`, `data.image_size`, `data.crop_size`, `train.epochs`,
  `model.target`, `model.metadata`); keys an older file lacks read as today's defaults.
- `git_commit`: the commit in the newest row for this experiment of the submissions manifest
  (`<infer.submissions_dir>/manifest.csv`, the folder named by the run's `infer.config.yaml`,
  else by its `config.yaml`): the code that ran its inference. Training records no commit, so it
  is blank before the first `make infer`.
- `date` (UTC): when the CV was written (`cv.json`'s modification time); before that, the time
  of the experiment's newest manifest row.
- `best_public`, `latest_public`, `latest_private`: the rows of `scores.csv` whose `experiment`
  is this one, read from the live config's `infer.submissions_dir`, the default `submissions/`
  and each run's submissions folder: the best public score, and the public and private scores
  of the newest row (by `time`) that has a public score.

A missing file or value leaves a blank. A run file that cannot be read (`config.yaml`,
`cv.json`, `tta_oof.json`) puts its error in the `error` column; a shared one (a manifest,
`scores.csv`) is a warning in the log.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_write_csv, atomic_write_text
from pipeline.config import Config, ConfigError, InferConfig, load_config
from pipeline.errors import UserError
from pipeline.report_html import PAGE
from pipeline.scores import SCORES_NAME
from pipeline.scores import read_scores as scores_table
from pipeline.submissions import MANIFEST_COLUMNS, read_manifest

log = logging.getLogger(__name__)

CSV_NAME = "experiments.csv"
HTML_NAME = "experiments.html"
SCORES_USED = ["time", "experiment", "public_score", "private_score"]
DATE_FORMAT = "%Y-%m-%d %H:%M"
COLUMNS = [
    "experiment", "cv_auc", "cv_auc_2020", "cv_auc_2020_ci95_low", "cv_auc_2020_ci95_high",
    "mean_fold_auc", "tta_gain", "backbone", "image_size", "crop_size", "epochs", "target",
    "metadata", "git_commit", "date", "best_public", "latest_public", "latest_private", "error",
]
FLOATS = ["cv_auc", "cv_auc_2020", "cv_auc_2020_ci95_low", "cv_auc_2020_ci95_high",
          "mean_fold_auc", "tta_gain", "best_public", "latest_public", "latest_private"]
INTS = ["image_size", "crop_size", "epochs"]
# the headers shown in the terminal and the HTML page; the CSV keeps the column names
LABELS = {
    "cv_auc": "CV", "cv_auc_2020": "CV 2020", "ci95": "CV 2020 95% CI",
    "mean_fold_auc": "mean fold", "tta_gain": "TTA gain", "image_size": "size",
    "crop_size": "crop", "metadata": "meta", "git_commit": "commit", "date": "date (UTC)",
    "best_public": "best public", "latest_public": "latest public",
    "latest_private": "latest private",
}


def experiment_folders(runs_dir: Path) -> list[Path]:
    """The folders directly under `runs_dir` that hold a config.yaml, by name; logs the others."""
    found, skipped = [], []
    for path in sorted(runs_dir.iterdir()):
        if path.is_dir():  # files (this table's own outputs) are not runs
            (found if (path / "config.yaml").is_file() else skipped).append(path)
    if skipped:
        log.info("skipped under %s, no config.yaml so not an experiment: %s", runs_dir,
                 ", ".join(p.name for p in skipped))
    return found


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None if there is no file; UserError if it cannot be read."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a JSON object")
    return data


def mean_fold_auc(cv: dict) -> float:
    """The mean per-fold AUC on the rows the CV quotes (2020 alone where it does)."""
    suffix = "_2020" if cv.get("cv_auc_metric") == "oof_auc_2020" else ""
    if f"mean_fold_auc{suffix}" in cv:
        return _number(cv[f"mean_fold_auc{suffix}"])
    folds = cv.get(f"folds{suffix}")
    values = [_number(v) for v in folds.values()] if isinstance(folds, dict) else []
    return float(pd.Series(values, dtype="float64").mean())


def cv_columns(folder: Path) -> dict:
    """CV, 2020-only CV with its interval, and mean fold AUC from the run's cv.json."""
    cv = _read_json(folder / "cv.json")
    if cv is None:
        return {}
    interval = cv.get("oof_auc_2020_ci95", cv.get("oof_auc_ci95"))
    low, high = interval if isinstance(interval, list) and len(interval) == 2 else (None, None)
    return {"cv_auc": _number(cv.get("cv_auc", cv.get("oof_auc"))),
            "cv_auc_2020": _number(cv.get("oof_auc_2020")),
            "cv_auc_2020_ci95_low": _number(low), "cv_auc_2020_ci95_high": _number(high),
            "mean_fold_auc": mean_fold_auc(cv)}


def tta_columns(folder: Path) -> dict:
    """The OOF AUC gain of all TTA views over none, from the run's tta_oof.json."""
    tta = _read_json(folder / "tta_oof.json")
    auc = tta.get("oof_auc") if tta else None
    if not isinstance(auc, dict) or not {"tta", "identity"} <= set(auc):
        return {}
    return {"tta_gain": _number(auc["tta"]) - _number(auc["identity"])}


def settings_columns(cfg: Config) -> dict:
    """The saved settings that tell experiments apart."""
    return {"backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
            "crop_size": cfg.data.crop_size, "epochs": cfg.train.epochs,
            "target": cfg.model.target or "binary", "metadata": cfg.model.metadata}


def load_run_config(path: Path) -> Config:
    """A run's saved config; any failure (an interpolation that does not resolve, too) is a
    ConfigError naming the file."""
    try:
        return load_config(path)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:  # OmegaConf's errors are ValueErrors
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{path}: cannot read the config: {reason}") from None


def submissions_dir(folder: Path, cfg: Config | None) -> Path | None:
    """Where the run's submissions went: the saved inference config says, else the training one."""
    saved = folder / "infer.config.yaml"
    if saved.is_file():
        try:
            return Path(load_run_config(saved).infer.submissions_dir)
        except ConfigError as err:
            log.warning("%s", err)
    return Path(cfg.infer.submissions_dir) if cfg is not None else None


def _read_manifest(folder: Path | None) -> pd.DataFrame:
    """The manifest in `folder`; empty when there is none or it cannot be read (a warning)."""
    if folder is not None:
        try:
            return read_manifest(folder)
        except (OSError, ValueError, UserError) as err:  # pandas' parse errors are ValueErrors
            log.warning("%s: cannot read its manifest (%s); commits left blank", folder, err)
    return pd.DataFrame(columns=MANIFEST_COLUMNS)


def manifest_rows(folder: Path | None, experiment: str,
                  cache: dict[Path | None, pd.DataFrame]) -> pd.DataFrame:
    """The experiment's rows of the manifest in `folder`, oldest first, with `time` parsed;
    each manifest is read once (several experiments share one)."""
    key = folder.resolve() if folder is not None else None
    if key not in cache:
        cache[key] = _read_manifest(folder)
    rows = cache[key][cache[key]["experiment"].isin([experiment])]
    times = pd.to_datetime(rows["time"], utc=True, errors="coerce", format="ISO8601")
    return rows.assign(time=times).sort_values("time", kind="stable", na_position="first")


def provenance_columns(folder: Path, manifest: pd.DataFrame) -> dict:
    """The commit of the newest manifest row, and when the CV was written (else that row's time)."""
    commits = manifest["git_commit"].dropna()
    cv = folder / "cv.json"
    times = manifest["time"].dropna()  # oldest first
    if cv.is_file():
        date = datetime.fromtimestamp(cv.stat().st_mtime, timezone.utc)
    else:
        date = times.iloc[-1] if len(times) else None
    return {"git_commit": str(commits.iloc[-1]) if len(commits) else None,
            "date": date.strftime(DATE_FORMAT) if date is not None else None}


def experiment_row(folder: Path,
                   manifests: dict[Path | None, pd.DataFrame]) -> tuple[dict, Path | None]:
    """One experiment's row, and the folder its submissions went to (None if unknown)."""
    row: dict = {"experiment": folder.name}
    errors, cfg = [], None
    try:
        cfg = load_run_config(folder / "config.yaml")
        row.update(settings_columns(cfg))
    except ConfigError as err:
        errors.append(str(err))
    for columns in (cv_columns, tta_columns):
        try:
            row.update(columns(folder))
        except UserError as err:
            errors.append(str(err))
    subs = submissions_dir(folder, cfg)
    row.update(provenance_columns(folder, manifest_rows(subs, folder.name, manifests)))
    row["error"] = "; ".join(errors) or None
    return row, subs


def read_scores(paths: Iterable[Path]) -> pd.DataFrame:
    """The rows of every readable scores.csv among `paths` (each file once, read by
    `pipeline.scores.read_scores`): scores as numbers, `time` parsed. An unreadable file is a
    warning, not an error."""
    frames = []
    for path in dict.fromkeys(p.resolve() for p in paths if p.is_file()):
        try:
            frames.append(scores_table(path)[SCORES_USED])
        except (UserError, OSError, ValueError) as err:  # a foreign, empty or garbled file
            log.warning("%s: cannot read it (%s); its scores are left out", path, err)
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCORES_USED)
    for column in ("public_score", "private_score"):
        scores[column] = pd.to_numeric(scores[column], errors="coerce").astype("float64")
    scores["time"] = pd.to_datetime(scores["time"], utc=True, errors="coerce", format="ISO8601")
    return scores


def score_columns(scores: pd.DataFrame) -> pd.DataFrame:
    """Per experiment: the best public score, and the public and private score of the newest
    scored submission."""
    scored = scores.dropna(subset=["public_score"])
    scored = scored.sort_values("time", kind="stable", na_position="first")
    latest = scored.drop_duplicates("experiment", keep="last").set_index("experiment")
    return pd.DataFrame({"best_public": scored.groupby("experiment")["public_score"].max(),
                         "latest_public": latest["public_score"],
                         "latest_private": latest["private_score"]})


def experiments_frame(cfg: Config) -> pd.DataFrame:
    """One row per experiment folder under `cfg.runs_dir`, in COLUMNS, blanks where nothing is known."""
    runs = Path(cfg.runs_dir)
    if not runs.is_dir():
        raise UserError(f"runs_dir {runs} is not a folder: no experiments to list "
                        "(train one, or set runs_dir=...)")
    manifests: dict[Path | None, pd.DataFrame] = {}
    rows, folders = [], [Path(cfg.infer.submissions_dir), Path(InferConfig().submissions_dir)]
    for folder in experiment_folders(runs):
        row, subs = experiment_row(folder, manifests)
        rows.append(row)
        folders += [subs] if subs is not None else []
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if not c.endswith(("_public", "_private"))])
    scores = score_columns(read_scores(f / SCORES_NAME for f in folders))
    frame = frame.merge(scores, how="left", left_on="experiment", right_index=True)[COLUMNS]
    return frame.astype({**dict.fromkeys(FLOATS, "float64"), **dict.fromkeys(INTS, "Int64"),
                         "metadata": "boolean"})


def _decimals(values: pd.Series, spec: str = ".4f") -> pd.Series:
    return values.map(lambda v: "" if pd.isna(v) else format(v, spec))


def displayed(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as text cells: 4 decimals, the interval in one cell, metadata on/off, blanks."""
    shown = frame.astype("object").where(frame.notna(), "")
    for column in FLOATS:
        shown[column] = _decimals(frame[column], "+.4f" if column == "tta_gain" else ".4f")
    low, high = (_decimals(frame[f"cv_auc_2020_ci95_{end}"]) for end in ("low", "high"))
    shown["ci95"] = [f"[{a}, {b}]" if a and b else "" for a, b in zip(low, high, strict=True)]
    shown["metadata"] = frame["metadata"].map({True: "on", False: "off"}).astype("object").fillna("")
    order = [c for c in COLUMNS if not c.startswith("cv_auc_2020_ci95")]
    order.insert(order.index("cv_auc_2020") + 1, "ci95")
    return shown[order].astype("str").rename(columns=LABELS)


def table_text(shown: pd.DataFrame, runs: Path) -> str:
    if shown.empty:
        return f"no experiments under {runs} (a folder holding config.yaml)"
    return shown.to_string(index=False)


def html_page(shown: pd.DataFrame, runs: Path) -> str:
    """The table in the report's page template."""
    body = (f"<p>{len(shown)} experiment(s); blank: not measured or not found. CV and CI: OOF AUC "
            "with no TTA; scores: Kaggle public/private.</p>" + shown.to_html(index=False, border=0, na_rep=""))
    return PAGE.substitute(title=html.escape(f"Experiments under {runs}"), body=body)


def list_experiments(cfg: Config) -> str:
    """Write `<runs_dir>/experiments.csv` and `.html` for every experiment; return the table as text."""
    frame = experiments_frame(cfg)
    shown = displayed(frame)
    runs = Path(cfg.runs_dir)
    atomic_write_csv(frame, runs / CSV_NAME)
    atomic_write_text(runs / HTML_NAME, html_page(shown, runs))
    log.info("wrote %s and %s (%d experiment(s))", runs / CSV_NAME, runs / HTML_NAME, len(frame))
    return table_text(shown, runs)
