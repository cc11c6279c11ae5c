"""Numbered submission files and their manifest, safe when several processes write at once.

A submission is written whole under a temporary name and then hard-linked to
`submission<N>.csv`; linking fails if the name exists, so two writers never take the same N,
nothing is overwritten and no reader sees a half-written file. The manifest
(`manifest.csv` in the same folder) gets one row per file, appended under an exclusive lock.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline.atomic import NO_ROOM, create_temp, no_room_error
from pipeline.errors import UserError

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
    """The frame as a finished temporary CSV in `folder`; removed again if the write fails."""
    fd, tmp = create_temp(folder, ".submission.")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            df.to_csv(handle, index=False, lineterminator="\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            raise no_room_error(err, folder / "submission<N>.csv") from None
        raise
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
def locked(lock_path: Path) -> Iterator[None]:
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
    with locked(folder / f".{MANIFEST_NAME}.lock"):
        if path.exists():
            cut_torn_tail(path)  # may leave an empty file: a torn header
        new = not path.exists() or path.stat().st_size == 0
        text = csv_line(MANIFEST_COLUMNS, row)
        if new:
            text = ",".join(MANIFEST_COLUMNS) + "\n" + text
        append_whole(path, text)
    return path


def csv_line(columns: Sequence[str], row: dict) -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n").writerow(row)
    return buffer.getvalue()


def append_whole(path: Path, text: str) -> None:
    """Append `text` in one write; if it cannot be written whole, cut the file back to where it was."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # a short write is retried: the retry raises the real reason
                n = os.write(fd, data[written:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += n
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, start)
            if err.errno in NO_ROOM:
                raise no_room_error(err, path, "the row was not added, earlier rows are intact") from None
            raise
    finally:
        os.close(fd)


def torn_tail(data: bytes) -> int | None:
    """Where an unfinished last line starts (a write cut short), or None if the file ends whole."""
    if not data or data.endswith(b"\n"):
        return None
    return data.rfind(b"\n") + 1


def cut_torn_tail(path: Path) -> None:
    """Remove an unfinished last line left by an interrupted writer, saying so."""
    data = path.read_bytes()
    start = torn_tail(data)
    if start is not None:
        log.warning("%s: removed an unfinished last line (%r) left by an interrupted run", path,
                    data[start:start + 80].decode(errors="replace"))
        os.truncate(path, start)


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """The manifest as a frame (empty, with the columns, if there is none yet).

    `n` is int, `fold` and `seed` nullable ints, `cv_auc` float; the rest are strings.
    """
    path = Path(folder) / MANIFEST_NAME
    data = path.read_bytes() if path.exists() else b""
    start = torn_tail(data)
    if start is not None:
        line = data[:start].count(b"\n") + 1
        log.warning("%s: line %d is unfinished (an interrupted run); ignoring it", path, line)
        data = data[:start]
    if not data:  # no file, or nothing whole in it yet
        return pd.DataFrame({c: pd.Series(dtype="string") for c in MANIFEST_COLUMNS})
    header = data.split(b"\n", 1)[0].decode(errors="replace")
    if header != ",".join(MANIFEST_COLUMNS):
        raise UserError(f"{path}: line 1 is {header[:120]!r}, not the manifest header "
                        f"{','.join(MANIFEST_COLUMNS)!r}; move the file aside and rerun inference")
    df = pd.read_csv(io.BytesIO(data), dtype="string", keep_default_na=False, na_values=[""])
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
