"""Numbered submission files and their manifest, safe when several processes write at once.

A submission is written whole under a temporary name and then hard-linked to
`submission<N>.csv`; linking fails if the name exists, so two writers never take the same N,
nothing is overwritten and no reader sees a half-written file. The manifest
(`manifest.csv` in the same folder) gets one row per file, appended under an exclusive lock.
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["image_name", "target"]
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = [
    "n",
    "file",
    "experiment",
    "fold",
    "checkpoint",
    "view",
    "seed",
    "cv_auc",
    "config_hash",
    "git_commit",
    "time",
]
_NUMBERED = re.compile(r"^submission(\d+)\.csv$")


def submission_numbers(folder: str | Path) -> list[int]:
    """The N of every `submission<N>.csv` in `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = (_NUMBERED.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _write_temp_csv(df: pd.DataFrame, folder: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=".submission.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w", newline="") as handle:
        df.to_csv(handle, index=False, lineterminator="\n")
        handle.flush()
        os.fsync(handle.fileno())
    return Path(tmp)


def _claim(tmp: Path, final: Path) -> None:
    """Give the finished temp file the name `final`, failing with FileExistsError if it is taken."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        # a file system without hard links: reserve the name exclusively, then move the content in
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, final)


def write_numbered(df: pd.DataFrame, folder: str | Path) -> tuple[int, Path]:
    """Write `df` (image_name, target) as `folder/submission<N>.csv` with N the next free number.

    Returns `(N, path)`. Safe against concurrent writers: each N is claimed exclusively.
    """
    missing = [c for c in SUBMISSION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"submission frame lacks column(s) {missing}; has {list(df.columns)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp_csv(df[SUBMISSION_COLUMNS], folder)
    try:
        n = max(submission_numbers(folder), default=0) + 1
        while True:
            final = folder / f"submission{n}.csv"
            try:
                _claim(tmp, final)
                break
            except FileExistsError:
                n += 1
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("wrote %s (%d rows)", final, len(df))
    return n, final


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def append_manifest(folder: str | Path, row: dict) -> Path:
    """Append one row to `folder/manifest.csv` under an exclusive lock; the header is written once.

    Keys must be among MANIFEST_COLUMNS; missing ones are left empty, and `time` defaults to now (UTC).
    """
    unknown = sorted(set(row) - set(MANIFEST_COLUMNS))
    if unknown:
        raise ValueError(f"unknown manifest column(s) {unknown}; valid: {MANIFEST_COLUMNS}")
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    with _locked(folder / f".{MANIFEST_NAME}.lock"):
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """The manifest as a frame (empty, with the columns, if there is none yet).

    `n` is int, `fold` and `seed` nullable ints, `cv_auc` float; the rest are strings.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype="string") for c in MANIFEST_COLUMNS})
    df = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""])
    for column in ("n", "fold", "seed"):
        df[column] = pd.to_numeric(df[column], errors="coerce").astype("Int64")
    df["cv_auc"] = pd.to_numeric(df["cv_auc"], errors="coerce").astype("float64")
    return df


def select_members(
    manifest: pd.DataFrame,
    experiments: Sequence[str] = (),
    folds: Sequence[int] = (),
    views: Sequence[str] = (),
    n_min: int | None = None,
    n_max: int | None = None,
    numbers: Sequence[int] = (),
) -> pd.DataFrame:
    """Manifest rows matching every filter, sorted by n; an empty filter or None bound matches all.

    `n_min` and `n_max` bound the submission number, inclusive; `numbers` lists exact ones.
    """
    keep = pd.Series(True, index=manifest.index)
    if experiments:
        keep &= manifest["experiment"].isin(list(experiments))
    if folds:
        keep &= manifest["fold"].isin([int(f) for f in folds]).fillna(False).astype(bool)
    if views:
        keep &= manifest["view"].isin(list(views))
    if n_min is not None:
        keep &= (manifest["n"] >= n_min).fillna(False).astype(bool)
    if n_max is not None:
        keep &= (manifest["n"] <= n_max).fillna(False).astype(bool)
    if numbers:
        keep &= manifest["n"].isin([int(n) for n in numbers]).fillna(False).astype(bool)
    return manifest[keep.astype(bool)].sort_values("n", kind="stable").reset_index(drop=True)
