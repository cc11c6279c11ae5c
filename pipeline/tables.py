"""Read input CSVs and reject bad ones with errors that name the file, the column and the rows."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError

log = logging.getLogger(__name__)

SHOW = 10  # how many offending rows or names an error lists before summarising


def _rows(index: Iterable[int]) -> str:
    """CSV line numbers (header is line 1) for a set of 0-based row positions."""
    lines = [str(i + 2) for i in index]
    more = f" (+{len(lines) - SHOW} more)" if len(lines) > SHOW else ""
    return ", ".join(lines[:SHOW]) + more


def some(values: Iterable[object], show: int = SHOW) -> str:
    """The first `show` values, comma-separated, then how many more: for error messages."""
    values = [str(v) for v in values]
    more = f" (+{len(values) - show} more)" if len(values) > show else ""
    return ", ".join(values[:show]) + more


def read_csv(path: str | Path, required: Iterable[str]) -> pd.DataFrame:
    """Read a CSV, requiring the file to exist, to have rows and to hold the `required` columns."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={c: "string" for c in required if "target" not in c})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as err:
        raise UserError(f"{path}: cannot parse CSV: {err}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: missing required column(s) {missing}; found {list(df.columns)}"
        )
    if df.empty:
        raise UserError(f"{path}: has a header but no rows")
    return df


# other headers the same column goes by in published copies (ISIC 2019's metadata says `gender`)
ALIASES = {"sex": ("gender",), "gender": ("sex",)}


def optional_column(df: pd.DataFrame, column: str, path: str | Path) -> pd.Series:
    """A metadata column that may be absent: read under its name or a known alias; when absent,
    all missing, with a warning naming the file, the column and the columns the file has."""
    for name in (column, *ALIASES.get(column, ())):
        if name in df.columns:
            if name != column:
                log.info("%s: reading column %r as %r", path, name, column)
            return df[name]
    log.warning("%s: no column %r (nor %s); it is treated as missing on all %d row(s). "
                "Columns found: %s", path, column, list(ALIASES.get(column, ())) or "an alias",
                len(df), list(df.columns))
    return pd.Series(pd.NA, index=df.index, dtype="object")


def check_unique(df: pd.DataFrame, column: str, path: str | Path) -> None:
    """Each value of `column` must appear once."""
    dup = df[column].duplicated(keep=False)
    if dup.any():
        names = sorted(set(df.loc[dup, column]))
        raise UserError(
            f"{path}: {len(names)} duplicate value(s) in column {column!r}: {some(names)} "
            f"at CSV line(s) {_rows(df.index[dup])}"
        )


def check_binary(df: pd.DataFrame, column: str, path: str | Path) -> pd.Series:
    """The column must hold 0/1 (as numbers or '0.0'/'1.0'); returns it as int64."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        shown = some(df.loc[bad, column].astype(str).head(SHOW))
        raise UserError(
            f"{path}: column {column!r} must be 0 or 1; {int(bad.sum())} row(s) are not, "
            f"at CSV line(s) {_rows(df.index[bad])}: {shown}"
        )
    return values.astype("int64")


def file_defect(path: str) -> str | None:
    """Why an image file cannot be used, from its size and a JPEG's first and last bytes (no
    decode: cheap enough for every image before a run): missing, empty, or a JPEG cut short."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if not head:
                return "empty"
            f.seek(max(0, f.seek(0, 2) - 32))
            tail = f.read()
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if str(path).lower().endswith((".jpg", ".jpeg")):
        if head != b"\xff\xd8":
            return "not a JPEG"
        if b"\xff\xd9" not in tail:
            return "truncated JPEG"
    return None


def check_files_exist(paths: pd.Series, names: pd.Series, source: str) -> None:
    """Every listed image must be on disk and whole; reports every bad one, by reason, at once."""
    defects = paths.map(file_defect)
    bad = defects.notna()
    if bad.any():
        folder = Path(paths[bad].iloc[0]).parent
        kinds = [f"{kind}: {int((defects == kind).sum())} ({some(names[defects == kind])})"
                 for kind in sorted(set(defects[bad]))]
        raise UserError(
            f"{source}: {int(bad.sum())} of {len(paths)} listed image(s) missing or unreadable "
            f"(looked in {folder}); " + "; ".join(kinds)
        )
