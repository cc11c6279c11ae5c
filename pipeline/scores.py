"""Kaggle's scores for our submissions, read back with the `kaggle` CLI, and the table they go in.

After `make submit`, `track_submission` polls `kaggle competitions submissions <competition> -v`
(CSV) until Kaggle has scored the new submission or a time limit passes, then appends one row to
`<infer.submissions_dir>/scores.csv`: complete with its public (and private) score, error with
Kaggle's error text logged, or pending. `refresh_scores` (`make scores`) fills in the pending rows
later and logs the table.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline import submit as kaggle  # the CLI wrapper, looked up at call time (tests patch it)
from pipeline.atomic import atomic_write_csv
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.submissions import append_whole, csv_line, cut_torn_tail, locked, torn_tail

log = logging.getLogger(__name__)

SCORES_NAME = "scores.csv"
SCORES_COLUMNS = ["time", "competition", "file", "message", "experiment", "cv_auc", "status",
                  "public_score", "private_score", "ref"]
POLL_S = 10.0  # between two looks at the listing
WAIT_S = 600.0  # Kaggle scores this competition in a few minutes; later ones `make scores` reads
LIST_TIMEOUT_S = 120.0  # one `kaggle competitions submissions` call
PENDING, COMPLETE, ERROR = "pending", "complete", "error"
FINAL = {COMPLETE, ERROR}
_REF = re.compile(r"Submission ref:\s*(\d+)")
_NO_SCORE = {"", "none", "null"}  # how the CLI prints a score Kaggle has not given


@dataclass(frozen=True)
class Listed:
    """One submission as `kaggle competitions submissions` lists it; status complete|pending|error."""

    ref: str
    description: str
    status: str
    public_score: str
    private_score: str
    file_name: str = ""


@dataclass(frozen=True)
class Sent:
    """A submission just made: its scores.csv row, less what Kaggle has to say about it."""

    time: str
    competition: str
    file: str
    message: str
    experiment: str
    cv_auc: float | None
    ref: str  # "" when the CLI printed none (kaggle < 2)


# ---- reading the CLI's answers ---------------------------------------------------------------


def submission_ref(submit_output: str) -> str:
    """The ref `kaggle competitions submit` printed ("Submission ref: 123"), or ""."""
    found = _REF.search(submit_output)
    return found.group(1) if found else ""


def _status(text: str) -> str:
    """complete | pending | error from the CLI's "SubmissionStatus.COMPLETE" (kaggle 2) or
    "complete" (kaggle 1)."""
    return text.strip().rsplit(".", 1)[-1].lower().removeprefix("submission_status_")


def _score(text: str | None) -> str:
    text = (text or "").strip()
    return "" if text.lower() in _NO_SCORE else text


def parse_listing(output: str) -> list[Listed]:
    """The submissions in the CSV that `kaggle competitions submissions -v` prints, newest first.

    Lines before the header (a warning of the CLI) are skipped; no header is an error quoting the
    output, except the CLI's "No submissions found".
    """
    offset = 0
    for line in output.splitlines(keepends=True):
        fields = next(csv.reader([line]), [])
        if {"description", "status", "publicScore"} <= set(fields):
            reader = csv.DictReader(io.StringIO(output[offset:]))
            return [_listed(row) for row in reader if row.get("status")]
        offset += len(line)
    if "No submissions found" in output:
        return []
    raise UserError("`kaggle competitions submissions` printed no submissions table: "
                    f"{' / '.join(kaggle.output_lines(output)) or 'nothing'}")


def _listed(row: dict) -> Listed:
    return Listed(ref=(row.get("ref") or "").strip(), description=row.get("description") or "",
                  status=_status(row["status"]), public_score=_score(row.get("publicScore")),
                  private_score=_score(row.get("privateScore")),
                  file_name=row.get("fileName") or "")


def list_submissions(competition: str, secrets: Sequence[str]) -> list[Listed]:
    """Our team's submissions to `competition`, newest first (the CLI's first page, 20)."""
    output = kaggle.run_kaggle(["competitions", "submissions", competition, "-v", "-q"], secrets,
                        timeout=LIST_TIMEOUT_S)
    return parse_listing(output)


def find_submission(listed: Sequence[Listed], ref: str, message: str) -> Listed | None:
    """Ours among `listed`: by ref where known, else the newest with exactly our message."""
    if ref:
        return next((s for s in listed if s.ref == ref), None)
    return next((s for s in listed if s.description.strip() == message.strip()), None)


def parse_error(output: str) -> str:
    """The "Error:" field of `kaggle competitions submission <ref>`, its lines joined."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Error:"):
            parts = [line.removeprefix("Error:").strip()]
            for more in lines[i + 1:]:
                if not more[:1].isspace():
                    break
                parts.append(more.strip())
            return " ".join(p for p in parts if p)
    return ""


def error_text(ref: str, secrets: Sequence[str]) -> str:
    """Kaggle's reason for a scoring error; "" where the CLI cannot say (kaggle < 2 has no
    `competitions submission`, and the listing carries no error text)."""
    if not ref:
        return ""
    try:
        output = kaggle.run_kaggle(["competitions", "submission", ref], secrets, timeout=LIST_TIMEOUT_S)
    except UserError as err:
        log.warning("could not read Kaggle's error text for submission %s: %s", ref, err)
        return ""
    return parse_error(output)


# ---- waiting for a score ---------------------------------------------------------------------


def _look(competition: str, secrets: Sequence[str], ref: str, message: str) -> Listed | None:
    try:
        return find_submission(list_submissions(competition, secrets), ref, message)
    except UserError as err:  # one failed look must not lose the submission's row
        log.warning("%s; looking again", err)
        return None


def await_score(competition: str, secrets: Sequence[str], ref: str, message: str,
                wait_s: float = WAIT_S, poll_s: float = POLL_S) -> Listed | None:
    """Look at the listing every `poll_s` seconds until our submission is complete or errored, or
    `wait_s` seconds have passed; return it as last seen (None if never listed)."""
    start = time.monotonic()
    polls = 0
    while True:
        found = _look(competition, secrets, ref, message)
        polls += 1
        waited = time.monotonic() - start
        if found is not None and found.status in FINAL:
            return found
        state = found.status if found is not None else "not listed yet"
        name = (ref or found.ref) if found is not None else ref
        log.info("waiting for Kaggle to score submission %s: %s after %.0f s (look %d, at most "
                 "%.0f s, every %g s)", name or repr(message), state, waited, polls, wait_s, poll_s)
        if waited + poll_s > wait_s:
            return found
        time.sleep(poll_s)


def track_submission(sent: Sent, secrets: Sequence[str], table: str | Path,
                     wait_s: float | None = None, poll_s: float | None = None) -> dict:
    """Wait (bounded) for Kaggle to score `sent`, append its row to `table`, log the outcome."""
    wait_s = WAIT_S if wait_s is None else wait_s
    poll_s = POLL_S if poll_s is None else poll_s
    row = {"time": sent.time, "competition": sent.competition, "file": sent.file,
           "message": sent.message, "experiment": sent.experiment,
           "cv_auc": "" if sent.cv_auc is None else f"{sent.cv_auc:.4f}",
           "status": PENDING, "public_score": "", "private_score": "", "ref": sent.ref}
    append_score(table, row)  # recorded at once: a wait cut short leaves a row for `make scores`
    found = await_score(sent.competition, secrets, sent.ref, sent.message, wait_s, poll_s)
    if found is not None:
        row.update(_kaggle_fields(found, row["ref"]))
        update_row(table, row)
    error = error_text(row["ref"], secrets) if row["status"] == ERROR else ""
    log_outcome(row, Path(table), error, waited_s=wait_s)
    return row


def _kaggle_fields(found: Listed, ref: str) -> dict:
    return {"status": found.status, "public_score": found.public_score,
            "private_score": found.private_score, "ref": ref or found.ref}


def log_outcome(row: dict, table: Path, error: str = "", waited_s: float | None = None) -> None:
    """One line for a row: its scores beside the CV, the error, or how to read it later."""
    name = f"submission {row['ref'] or '(no ref)'} of {row['file'] or row['competition']}"
    if row["status"] == COMPLETE:
        private = f", private {row['private_score']}" if row["private_score"] else ""
        log.info("%s: public score %s%s, cv %s (%s)", name, row["public_score"] or "n/a", private,
                 row["cv_auc"] or "n/a", row["message"])
    elif row["status"] == ERROR:
        reason = error or ("Kaggle gave no reason here; see https://www.kaggle.com/competitions/"
                           f"{row['competition']}/submissions")
        log.error("%s: Kaggle could not score it: %s (recorded as error in %s)", name, reason, table)
    else:
        after = f" after {waited_s:.0f} s" if waited_s is not None else ""
        log.warning("%s: still %s%s; recorded as pending in %s: run `make scores` (same CONFIG) "
                    "later to read its score", name, row["status"], after, table)


# ---- the scores table ------------------------------------------------------------------------


def scores_path(cfg: Config) -> Path:
    """`scores.csv` beside the manifest, in `infer.submissions_dir`."""
    return Path(cfg.infer.submissions_dir) / SCORES_NAME


def _lock(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def append_score(path: str | Path, row: dict) -> None:
    """Append one whole row to the scores table under an exclusive lock; the header is written once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(_lock(path)):
        if path.exists():
            cut_torn_tail(path)
        text = csv_line(SCORES_COLUMNS, row)
        if not path.exists() or path.stat().st_size == 0:
            text = ",".join(SCORES_COLUMNS) + "\n" + text
        append_whole(path, text)


def update_row(path: str | Path, row: dict) -> None:
    """Replace the row sent at `row['time']` to `row['competition']` with `row`, under the lock."""
    path = Path(path)
    with locked(_lock(path)):
        table = read_scores(path)
        match = (table["time"] == row["time"]) & (table["competition"] == row["competition"])
        for key, value in row.items():
            table.loc[match, key] = value
        atomic_write_csv(table[SCORES_COLUMNS], path)


def read_scores(path: str | Path) -> pd.DataFrame:
    """The scores table, every column a string ("" where empty); no file gives an empty table."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    start = torn_tail(data)
    if start is not None:
        log.warning("%s: its last line is unfinished (an interrupted run); ignoring it", path)
        data = data[:start]
    if not data:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SCORES_COLUMNS})
    header = data.split(b"\n", 1)[0].decode(errors="replace")
    if header != ",".join(SCORES_COLUMNS):
        raise UserError(f"{path}: line 1 is {header[:120]!r}, not the scores header "
                        f"{','.join(SCORES_COLUMNS)!r}; move the file aside")
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)


def _update_pending(table: pd.DataFrame, listings: dict[str, list[Listed]]) -> list[int]:
    """Fill pending rows from the listings; return the indices of rows that changed."""
    changed = []
    for i, row in table.iterrows():
        if row["status"] in FINAL or row["competition"] not in listings:
            continue
        found = find_submission(listings[row["competition"]], row["ref"], row["message"])
        if found is None:
            log.warning("submission %s (%s) is not among the latest submissions Kaggle lists for "
                        "%s; left as %s", row["ref"] or "(no ref)", row["message"],
                        row["competition"], row["status"] or PENDING)
            continue
        fields = _kaggle_fields(found, row["ref"])
        if any(row[k] != v for k, v in fields.items()):
            for key, value in fields.items():
                table.at[i, key] = value
            changed.append(i)
    return changed


def refresh_scores(cfg: Config) -> pd.DataFrame:
    """`make scores`: read Kaggle's scores for the table's pending rows, rewrite the table, log it."""
    path = scores_path(cfg)
    table = read_scores(path)
    waiting = table[~table["status"].isin(FINAL)]
    if len(waiting):
        secrets = kaggle.find_kaggle_credentials().secrets
        listings = {c: list_submissions(c, secrets) for c in waiting["competition"].unique()}
        with locked(_lock(path)):  # a submit may have appended a row meanwhile
            table = read_scores(path)
            changed = _update_pending(table, listings)
            if changed:
                atomic_write_csv(table[SCORES_COLUMNS], path)
        for i in changed:
            row = table.loc[i].to_dict()
            error = error_text(row["ref"], secrets) if row["status"] == ERROR else ""
            log_outcome(row, path, error)
    log.info("%s\n%s", path, scores_text(table) if len(table) else "(no submissions recorded yet)")
    return table


def scores_text(table: pd.DataFrame) -> str:
    """The table as text: when, what, the CV quoted and Kaggle's scores."""
    shown = table[["time", "experiment", "cv_auc", "public_score", "private_score", "status", "ref",
                   "message"]]
    return shown.to_string(index=False)
