"""Check a submission against sample_submission.csv, then send it with the real `kaggle` CLI.

After sending, `submit` waits (bounded) for Kaggle's score and records it in scores.csv
(pipeline.scores).

The CLI runs as a subprocess with the user's own credentials. Those are looked up first, the way
kaggle 2.x looks them up, so a missing key is one clear error rather than the CLI's help page, and
every secret found is redacted from whatever the CLI prints before we log or raise it.
"""

from __future__ import annotations

import base64
import codecs
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.provenance import git_commit
from pipeline.tables import some

log = logging.getLogger(__name__)

HEADER = "image_name,target"
SHOW = 10  # offending ids listed per defect before "+N more"
SUBMIT_TIMEOUT_S = 600
NAN_WORDS = {"nan", "+nan", "-nan"}
# Variables that make the CLI print its requests, Authorization header included.
VERBOSE_VARS = ("VERBOSE", "VERBOSE_OUTPUT")
CREDENTIALS_HELP = (
    "create an API token at https://www.kaggle.com/settings/api, then either export "
    "KAGGLE_USERNAME and KAGGLE_KEY, or save kaggle.json ({\"username\": ..., \"key\": ...}, "
    "chmod 600) in $KAGGLE_CONFIG_DIR or ~/.kaggle/, or export KAGGLE_API_TOKEN (or save it to "
    "~/.kaggle/access_token), or run `kaggle auth login`"
)


class SubmissionError(UserError):
    """A submission file that Kaggle would reject or score wrongly."""


class CredentialsError(UserError):
    """No Kaggle credentials that the kaggle CLI would accept."""


# ---- checking a submission -------------------------------------------------------------------


def _sample_ids(sample_path: str | Path) -> pd.Series:
    path = Path(sample_path)
    if not path.is_file():
        raise UserError(f"sample submission not found: {path} (set data.sample_submission)")
    sample = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "image_name" not in sample.columns:
        raise UserError(f"{path}: no image_name column; found {list(sample.columns)}")
    ids = sample["image_name"]
    dup = ids.duplicated(keep=False)
    if dup.any():
        shown = [f"{i} (line {n + 2})" for n, i in ids[dup].items()]
        raise UserError(f"{path}: the sample submission lists {ids[dup].nunique()} image id(s) more "
                        f"than once: {some(shown, SHOW)}; a submission cannot match it")
    return ids


def check_ids(ids: pd.Series, sample_path: str | Path, what: str) -> None:
    """Refuse a set of ids (a test set's, before inference) that is not exactly the sample's."""
    defects = _id_defects(ids.reset_index(drop=True), _sample_ids(sample_path), sample_path)
    if defects:
        raise SubmissionError(f"{what}: its image ids do not match {sample_path}, so no submission "
                              f"from it would be accepted: " + "; ".join(defects))


def check_before_replace(tmp: Path, final: Path, sample_path: str | Path) -> None:
    """Check a finished temporary submission before it replaces `final`; where no sample
    submission exists, say that nothing was checked."""
    if not Path(sample_path).is_file():
        log.warning("%s not found: %s is written unchecked (set data.sample_submission)",
                    sample_path, final)
        return
    try:
        check_submission(tmp, sample_path)
    except SubmissionError as err:
        reason = str(err).split(": ", 1)[1]
        raise SubmissionError(f"{final}: not replaced, the new file fails the check: {reason}") from None


def _first_line(path: Path) -> str:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        return f.readline().rstrip("\r\n")


def _id_defects(ids: pd.Series, sample_ids: pd.Series, sample_path: str | Path) -> list[str]:
    defects = []
    counts = ids.value_counts(sort=False)
    dups = [i for i in ids.drop_duplicates() if counts[i] > 1]
    if dups:
        lines = ids.groupby(ids, sort=False).groups
        shown = [f"{i} (lines {', '.join(str(n + 2) for n in lines[i])})" for i in dups]
        defects.append(f"{len(dups)} duplicated id(s): {some(shown, SHOW)}")
    present = set(ids)
    missing = [i for i in sample_ids if i not in present]
    if missing:
        defects.append(f"{len(missing)} id(s) of {sample_path} missing: {some(missing, SHOW)}")
    expected = set(sample_ids)
    extra = [f"{i!r} (line {n + 2})" for n, i in enumerate(ids) if i not in expected]
    if extra:
        defects.append(f"{len(extra)} id(s) not in {sample_path}: {some(extra, SHOW)}")
    return defects


def _target_defects(ids: pd.Series, raw: pd.Series) -> tuple[pd.Series, list[str]]:
    """Parse the target column; name every row that is not a finite number in [0, 1]."""
    text = raw.str.strip()
    values = pd.to_numeric(text, errors="coerce")
    is_nan_word = text.str.lower().isin(NAN_WORDS)
    kinds = {
        "missing or non-numeric target(s)": values.isna() & ~is_nan_word,
        "NaN target(s)": values.isna() & is_nan_word,
        "infinite target(s)": values.abs() == math.inf,
        "target(s) outside [0, 1]": values.notna() & (values.abs() != math.inf)
        & ((values < 0) | (values > 1)),
    }
    defects = []
    for what, bad in kinds.items():
        if bad.any():
            shown = [f"{i} (line {n + 2}: {v!r})" for n, i, v in zip(
                bad[bad].index, ids[bad], raw[bad], strict=True)]
            defects.append(f"{len(shown)} {what}: {some(shown, SHOW)}")
    return values.astype("float64"), defects


def check_submission(path: str | Path, sample_path: str | Path) -> pd.DataFrame:
    """Validate a submission CSV against sample_submission.csv and return it (`target` as float).

    Header exactly `image_name,target`; the same ids as the sample, each once; every target a finite
    number in [0, 1]. All defects are collected into one SubmissionError naming the file and up to
    10 offending ids or lines of each kind.
    """
    path = Path(path)
    sample_ids = _sample_ids(sample_path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file not found")
    defects = []
    header = _first_line(path)
    if header != HEADER:
        defects.append(f"header is {header!r}, expected {HEADER!r}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[-1]
        raise SubmissionError(_report(path, [*defects, f"cannot be read as CSV: {reason}"])) from None
    if not {"image_name", "target"} <= set(df.columns):
        raise SubmissionError(_report(path, defects))
    df = df.fillna("")  # short rows leave NaN even with keep_default_na=False
    ids = df["image_name"]
    defects += _id_defects(ids, sample_ids, sample_path)
    target, target_defects = _target_defects(ids, df["target"])
    defects += target_defects
    if defects:
        raise SubmissionError(_report(path, defects))
    return pd.DataFrame({"image_name": ids, "target": target})


def _report(path: Path, defects: list[str]) -> str:
    return f"{path}: invalid submission, {len(defects)} problem(s): " + "; ".join(defects)


# ---- the submission message ------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read JSON: {err}") from None


def _run_cv(cfg: Config) -> object:
    """This run's headline CV from cv.json: `cv_auc`, else `oof_auc` (files written before it)."""
    path = cfg.run_dir / "cv.json"
    if not path.is_file():
        return None
    cv = _read_json(path)
    return cv.get("cv_auc", cv.get("oof_auc"))


def _ensemble_cv(cfg: Config, ens: dict) -> object:
    if ens.get("cv_auc_source") != "oof_in_sample":
        return ens.get("cv_auc")  # null: an ensemble without a CV of its own borrows none
    # weights fitted on the OOF rows make its AUC optimistic; this run's own CV is honest, but
    # only stands for an ensemble of this run alone: it must not borrow one run's score
    experiments = {g.get("experiment") for g in ens.get("groups", [])}
    return _run_cv(cfg) if experiments <= {cfg.experiment} else None


def cv_score(cfg: Config) -> float | None:
    """The CV AUC to quote, never an in-sample one.

    The ensemble's (`<ensemble output>.json`) where it was measured out of sample; for a weighted
    ensemble (weights fitted on the same OOF rows) this run's cv.json, or none if the ensemble
    spans other experiments; without an ensemble JSON, this run's cv.json.
    """
    ensemble_json = Path(cfg.ensemble.output).with_suffix(".json")
    if ensemble_json.is_file():
        value = _ensemble_cv(cfg, _read_json(ensemble_json))
    else:
        value = _run_cv(cfg)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def submission_message(cfg: Config, message: str) -> str:
    """`<message> | cv=<AUC to 4 decimals or n/a> | <git short commit>`."""
    return _message_with_cv(message, cv_score(cfg))


def _message_with_cv(message: str, cv: float | None) -> str:
    if not message or not message.strip():
        raise UserError("the submission message is empty: pass submit.message='...' (make submit MSG='...')")
    cv_text = f"{cv:.4f}" if cv is not None else "n/a"
    return f"{message.strip()} | cv={cv_text} | {git_commit()}"


# ---- credentials and the kaggle CLI ----------------------------------------------------------


@dataclass(frozen=True)
class KaggleCredentials:
    """Where the CLI will find its credentials, and the secret strings to keep out of any output."""

    source: str
    secrets: tuple[str, ...] = field(default=(), repr=False)


def kaggle_config_dir(env: dict[str, str] | None = None) -> Path:
    """The folder the kaggle CLI reads kaggle.json from (same rule as kaggle 2.x)."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    home = Path(env.get("HOME") or Path.home())
    legacy = home / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    return legacy


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _access_token(env: dict[str, str], home: Path) -> tuple[str, str] | None:
    """KAGGLE_API_TOKEN (a value or a file), else ~/.kaggle/access_token[.txt] (kagglesdk's order)."""
    token = env.get("KAGGLE_API_TOKEN", "")
    if token:
        from_file = _read_text(Path(token)) if Path(token).is_file() else ""
        return from_file or token, "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        if value := _read_text(home / ".kaggle" / name):
            return value, f"~/.kaggle/{name}"
    return None


def _basic_auth(user: str, key: str) -> str:
    return base64.b64encode(f"{user}:{key}".encode()).decode()


def find_kaggle_credentials(env: dict[str, str] | None = None) -> KaggleCredentials:
    """Credentials the kaggle CLI would use, checked in its order; CredentialsError when none.

    Accepted: an access token (KAGGLE_API_TOKEN, ~/.kaggle/access_token); a username and key
    (KAGGLE_USERNAME/KAGGLE_KEY, each overriding kaggle.json in the config folder); OAuth
    credentials from `kaggle auth login` (~/.kaggle/credentials.json).
    """
    env = dict(os.environ if env is None else env)
    home = Path(env.get("HOME") or Path.home())
    if found := _access_token(env, home):
        return KaggleCredentials(found[1], (found[0],))
    config_file = kaggle_config_dir(env) / "kaggle.json"
    file_values = _read_json_quietly(config_file)
    user = env.get("KAGGLE_USERNAME") or str(file_values.get("username") or "")
    key = env.get("KAGGLE_KEY") or str(file_values.get("key") or "")
    keys = {k for k in (env.get("KAGGLE_KEY"), str(file_values.get("key") or "")) if k}
    if user and key:
        source = "KAGGLE_KEY" if env.get("KAGGLE_KEY") else str(config_file)
        return KaggleCredentials(source, (*keys, _basic_auth(user, key)))
    oauth = _read_json_quietly(home / ".kaggle" / "credentials.json")
    if oauth.get("refresh_token"):
        secrets = (str(oauth["refresh_token"]), str(oauth.get("access_token") or ""))
        return KaggleCredentials("~/.kaggle/credentials.json", tuple(s for s in secrets if s))
    half = ""
    if user or key:
        half = f" (found a {'username' if user else 'key'} but no {'key' if user else 'username'})"
    raise CredentialsError(f"no Kaggle credentials{half}: {CREDENTIALS_HELP}; looked in "
                           f"the environment, {config_file} and {home / '.kaggle'}")


def _read_json_quietly(path: Path) -> dict:
    """A JSON object from `path`, or {} when absent or unreadable (the CLI ignores those too)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def kaggle_executable() -> str:
    """The `kaggle` CLI of this virtualenv if present, else the first on PATH."""
    local = Path(sys.executable).parent / ("kaggle.exe" if os.name == "nt" else "kaggle")
    if local.is_file():
        return str(local)
    found = shutil.which("kaggle")
    if found is None:
        raise UserError("the kaggle CLI was not found beside python or on PATH: pip install kaggle")
    return found


class Redactor:
    """Replace secrets in a text stream, including a secret split across two chunks."""

    def __init__(self, secrets: Sequence[str], mask: str = "***"):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.keep = max((len(s) for s in self.secrets), default=1) - 1
        self.mask = mask
        self.tail = ""

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, self.mask)
        return text

    def feed(self, chunk: str) -> str:
        """Redacted text that is safe to emit now; a possible secret's prefix is held back."""
        text = self.redact(self.tail + chunk)
        cut = len(text) - self.keep
        self.tail = text[max(cut, 0):]
        return text[:max(cut, 0)]

    def flush(self) -> str:
        text, self.tail = self.redact(self.tail), ""
        return text


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in VERBOSE_VARS}


def run_kaggle(args: Sequence[str], secrets: Sequence[str], timeout: float | None = None,
               echo: bool = False) -> str:
    """Run `kaggle <args>`; return its output (stdout and stderr) with every secret redacted.

    With `echo` the redacted output is also written to stderr as it arrives (progress bars of long
    downloads). A non-zero exit or a timeout raises UserError carrying the redacted output.
    """
    cmd = [kaggle_executable(), *args]
    log.info("running: %s", shlex.join(cmd))
    redactor = Redactor(secrets)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=_cli_env())
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill())) if timeout else None
    if timer is not None:
        timer.start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts = []
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            parts.append(_emit(redactor.feed(decoder.decode(chunk)), echo))
        parts.append(_emit(redactor.feed(decoder.decode(b"", final=True)) + redactor.flush(), echo))
        code = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    output = "".join(parts)
    what = f"`kaggle {' '.join(args[:2])}`"
    if timed_out.is_set():
        raise UserError(f"{what} timed out after {timeout:.0f} s and was stopped: "
                        f"{' / '.join(output_lines(output))}")
    if code != 0:
        raise UserError(f"{what} failed (exit {code}): {' / '.join(output_lines(output))}")
    return output


def output_lines(output: str) -> list[str]:
    """The CLI's output as stripped, non-empty lines, progress bars left out."""
    lines = (line.strip() for line in output.replace("\r", "\n").splitlines())
    return [line for line in lines if line and "%|" not in line]


def _emit(text: str, echo: bool) -> str:
    if echo and text:
        sys.stderr.write(text)
        sys.stderr.flush()
    return text


# ---- submit ----------------------------------------------------------------------------------


def submit(cfg: Config, message: str, wait_s: float | None = None,
           poll_s: float | None = None) -> str:
    """Check `cfg.ensemble.output`, `kaggle competitions submit` it, then wait for its score;
    return the message sent.

    The message is `<message> | cv=<CV AUC> | <git commit>` (see `submission_message`). Kaggle's
    listing is read every `poll_s` seconds for at most `wait_s` (pipeline.scores' POLL_S and
    WAIT_S by default); the outcome, scored, errored or still pending, becomes a row of
    scores.csv.
    """
    # imported here, not on top: pipeline.scores imports this module (its CLI wrapper)
    from pipeline.scores import Sent, scores_path, submission_ref, track_submission

    path = cfg.ensemble.output
    frame = check_submission(path, cfg.data.sample_submission)
    cv = cv_score(cfg)
    full_message = _message_with_cv(message, cv)
    credentials = find_kaggle_credentials()
    log.info("submitting %s (%d rows) to %s with credentials from %s: %r", path, len(frame),
             cfg.submit.competition, credentials.source, full_message)
    sent_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    output = run_kaggle(
        ["competitions", "submit", cfg.submit.competition, "-f", str(path), "-m", full_message],
        credentials.secrets, timeout=SUBMIT_TIMEOUT_S,
    )
    for line in output_lines(output):
        log.info("kaggle: %s", line)
    sent = Sent(time=sent_at, competition=cfg.submit.competition, file=str(path),
                message=full_message, experiment=cfg.experiment, cv_auc=cv,
                ref=submission_ref(output))
    track_submission(sent, credentials.secrets, scores_path(cfg), wait_s=wait_s, poll_s=poll_s)
    return full_message
