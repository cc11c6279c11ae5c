"""Submission checks, the submit message, Kaggle credentials, and the real kaggle CLI against a fake server."""

import base64
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import Config
from pipeline.submit import (
    CredentialsError,
    Redactor,
    SubmissionError,
    check_submission,
    find_kaggle_credentials,
    run_kaggle,
    submission_message,
    submit,
)
from tests.conftest import REAL

IDS = [f"ISIC_{i:04d}" for i in range(20)]
COMPETITION = "siim-isic-melanoma-classification"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def csv_text(rows, header="image_name,target") -> str:
    return header + "\n" + "".join(f"{i},{t}\n" for i, t in rows)


def good_rows(ids=IDS):
    return [(i, f"{(n % 10) / 10:.3f}") for n, i in enumerate(ids)]


@pytest.fixture
def sample(tmp_path) -> Path:
    return write(tmp_path / "sample_submission.csv", csv_text([(i, 0) for i in IDS]))


def check_text(tmp_path, sample, text) -> pd.DataFrame:
    return check_submission(write(tmp_path / "sub.csv", text), sample)


# ---- check_submission ------------------------------------------------------------------------


def test_good_submission_passes_in_file_order(tmp_path, sample):
    rows = good_rows()[::-1]
    df = check_text(tmp_path, sample, csv_text(rows))
    assert list(df.columns) == ["image_name", "target"]
    assert list(df["image_name"]) == [i for i, _ in rows]
    assert df["target"].dtype == np.float64
    assert df["target"].between(0, 1).all()


def test_bounds_zero_and_one_are_valid(tmp_path, sample):
    rows = [(i, "0" if n % 2 else "1.0") for n, i in enumerate(IDS)]
    assert len(check_text(tmp_path, sample, csv_text(rows))) == len(IDS)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda r: r[:3] + r[5:], ["2 id(s)", "missing", "ISIC_0003", "ISIC_0004"]),
        (lambda r: r + [("ISIC_9999", "0.5")], ["1 id(s) not in", "'ISIC_9999' (line 22)"]),
        (lambda r: r + [("ISIC_0007", "0.5")], ["1 duplicated id(s)", "ISIC_0007 (lines 9, 22)"]),
        (lambda r: r[:4] + [("ISIC_0004", "nan")] + r[5:], ["1 NaN target(s)", "ISIC_0004 (line 6"]),
        (lambda r: r[:4] + [("ISIC_0004", "inf")] + r[5:], ["1 infinite target(s)", "ISIC_0004"]),
        (lambda r: r[:4] + [("ISIC_0004", "-inf")] + r[5:], ["1 infinite target(s)", "ISIC_0004"]),
        (lambda r: r[:2] + [("ISIC_0002", "1.5")] + r[3:], ["outside [0, 1]", "ISIC_0002 (line 4: '1.5')"]),
        (lambda r: r[:2] + [("ISIC_0002", "-0.1")] + r[3:], ["outside [0, 1]", "ISIC_0002"]),
        (lambda r: r[:6] + [("ISIC_0006", "abc")] + r[7:], ["non-numeric", "ISIC_0006 (line 8: 'abc')"]),
        (lambda r: r[:6] + [("ISIC_0006", "")] + r[7:], ["non-numeric", "ISIC_0006 (line 8: '')"]),
    ],
    ids=["missing", "extra", "duplicate", "nan", "inf", "-inf", "above-1", "below-0", "text", "empty"],
)
def test_each_defect_is_named(tmp_path, sample, edit, expected):
    path = write(tmp_path / "sub.csv", csv_text(edit(good_rows())))
    with pytest.raises(SubmissionError) as err:
        check_submission(path, sample)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid submission, 1 problem(s)")
    for part in expected:
        assert part in message


@pytest.mark.parametrize("header", ["id,target", "image_name,prediction", "image_name, target",
                                    "\ufeffimage_name,target", "image_name,target,extra"])
def test_wrong_header_is_refused(tmp_path, sample, header):
    rows = good_rows()
    text = csv_text(rows, header) if "extra" not in header else header + "\n" + "".join(
        f"{i},{t},x\n" for i, t in rows)
    with pytest.raises(SubmissionError, match="header is .* expected 'image_name,target'"):
        check_text(tmp_path, sample, text)


def test_all_defects_are_reported_together(tmp_path, sample):
    rows = good_rows()[2:] + [("ISIC_0005", "0.5"), ("EXTRA_1", "2"), ("EXTRA_2", "nan")]
    with pytest.raises(SubmissionError) as err:
        check_text(tmp_path, sample, csv_text(rows))
    message = str(err.value)
    assert "5 problem(s)" in message
    for part in ["duplicated id(s): ISIC_0005", "missing: ISIC_0000, ISIC_0001",
                 "not in", "'EXTRA_1'", "outside [0, 1]: EXTRA_1", "NaN target(s): EXTRA_2"]:
        assert part in message


def test_long_lists_are_cut_with_a_count(tmp_path, sample):
    with pytest.raises(SubmissionError) as err:
        check_text(tmp_path, sample, csv_text(good_rows()[:5]))
    message = str(err.value)
    assert "15 id(s)" in message and "(+5 more)" in message
    assert "ISIC_0014" in message and "ISIC_0015" not in message


def test_missing_ragged_or_empty_files(tmp_path, sample):
    with pytest.raises(SubmissionError, match="not found"):
        check_submission(tmp_path / "nope.csv", sample)
    with pytest.raises(SubmissionError, match="cannot be read as CSV"):
        check_text(tmp_path, sample, csv_text(good_rows()) + "ISIC_0001,0.5,extra,fields\n")
    with pytest.raises(SubmissionError, match="header is ''"):
        check_text(tmp_path, sample, "")
    with pytest.raises(UserError, match="sample submission not found"):
        check_submission(write(tmp_path / "sub.csv", csv_text(good_rows())), tmp_path / "none.csv")


def test_submission_error_is_a_user_error():
    assert issubclass(SubmissionError, UserError)


@pytest.fixture
def real_sample() -> Path:
    path = REAL / "sample_submission.csv"
    if not path.is_file():
        pytest.skip(f"real sample submission not found at {path}")
    return path


def test_real_sample_submission(tmp_path, real_sample):
    sample = pd.read_csv(real_sample)
    assert len(sample) == 10982
    sub = sample.assign(target=np.random.default_rng(0).random(len(sample)))
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert len(check_submission(tmp_path / "sub.csv", real_sample)) == 10982
    sub.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SubmissionError, match=f"1 id\\(s\\) of .* missing: {sample.image_name[0]}"):
        check_submission(tmp_path / "short.csv", real_sample)


# ---- the message -----------------------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path, sample) -> Config:
    cfg = Config(experiment="exp1", runs_dir=str(tmp_path / "runs"))
    cfg.ensemble.output = str(tmp_path / "submissions" / "ensemble.csv")
    cfg.infer.submissions_dir = str(tmp_path / "submissions")  # scores.csv goes there
    cfg.data.sample_submission = str(sample)
    return cfg


def test_message_quotes_the_ensemble_cv_first(cfg):
    write(cfg.run_dir / "cv.json", json.dumps({"oof_auc": 0.85}))
    assert "| cv=0.8500 |" in submission_message(cfg, "b5")
    json_path = Path(cfg.ensemble.output).with_suffix(".json")
    write(json_path, json.dumps({"method": "mean", "files": [], "weights": [], "cv_auc": 0.912345}))
    message = submission_message(cfg, "  b5 512  ")
    assert message.startswith("b5 512 | cv=0.9123 | ")
    write(json_path, json.dumps({"method": "mean", "files": [], "weights": [], "cv_auc": None}))
    assert "| cv=n/a |" in submission_message(cfg, "b5")


def test_message_without_any_cv_and_empty_message(cfg):
    assert "| cv=n/a |" in submission_message(cfg, "b5")
    with pytest.raises(UserError, match="message is empty"):
        submission_message(cfg, " ")


# ---- credentials -----------------------------------------------------------------------------


def test_no_credentials_is_a_clear_error(clean_env):
    with pytest.raises(CredentialsError) as err:
        find_kaggle_credentials()
    message = str(err.value)
    for part in ["no Kaggle credentials", "KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json",
                 "https://www.kaggle.com/settings/api"]:
        assert part in message
    assert isinstance(err.value, UserError)


def test_half_credentials_name_the_missing_half_not_the_key(clean_env, monkeypatch, key, caplog, capsys):
    monkeypatch.setenv("KAGGLE_KEY", key)
    with pytest.raises(CredentialsError, match="found a key but no username") as err:
        find_kaggle_credentials()
    assert key not in str(err.value) + caplog.text + "".join(capsys.readouterr())


def test_submit_without_credentials_stops_before_the_cli(clean_env, cfg, monkeypatch, key, caplog, capsys):
    write(Path(cfg.ensemble.output), csv_text(good_rows()))
    monkeypatch.setenv("KAGGLE_KEY", key)
    monkeypatch.setattr("pipeline.submit.run_kaggle", lambda *a, **k: pytest.fail("CLI was run"))
    with caplog.at_level(logging.DEBUG), pytest.raises(CredentialsError):
        submit(cfg, "b5")
    assert key not in caplog.text + "".join(capsys.readouterr())


def test_credentials_from_env_and_kaggle_json(clean_env, monkeypatch, key, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", "testuser")
    monkeypatch.setenv("KAGGLE_KEY", key)
    found = find_kaggle_credentials()
    assert found.source == "KAGGLE_KEY"
    assert key in found.secrets
    assert base64.b64encode(f"testuser:{key}".encode()).decode() in found.secrets
    assert key not in repr(found)

    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.delenv("KAGGLE_USERNAME")
    config_dir = tmp_path / "cfgdir"
    write(config_dir / "kaggle.json", json.dumps({"username": "u", "key": key}))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config_dir))
    assert find_kaggle_credentials().source == str(config_dir / "kaggle.json")

    monkeypatch.delenv("KAGGLE_CONFIG_DIR")
    if sys.platform.startswith("linux"):  # without ~/.kaggle the CLI reads ~/.config/kaggle
        write(clean_env / ".config" / "kaggle" / "kaggle.json", json.dumps({"username": "u", "key": key}))
        assert find_kaggle_credentials().source.endswith(".config/kaggle/kaggle.json")
    write(clean_env / ".kaggle" / "kaggle.json", json.dumps({"username": "u", "key": key}))
    assert find_kaggle_credentials().source == str(clean_env / ".kaggle" / "kaggle.json")


def test_access_tokens_are_accepted(clean_env, monkeypatch, key):
    write(clean_env / ".kaggle" / "access_token", key + "\n")
    found = find_kaggle_credentials()
    assert found.source == "~/.kaggle/access_token" and found.secrets == (key,)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_" + key)
    assert find_kaggle_credentials().secrets == ("KGAT_" + key,)


def test_redactor_catches_a_secret_split_across_chunks(key):
    redactor = Redactor([key])
    text = f"error for testuser:{key} done"
    out = "".join(redactor.feed(text[i:i + 3]) for i in range(0, len(text), 3)) + redactor.flush()
    assert out == "error for testuser:*** done"


def test_run_kaggle_times_out_and_redacts(monkeypatch, key):
    monkeypatch.setattr("pipeline.submit.kaggle_executable", lambda: sys.executable)
    monkeypatch.setenv("FAKE_SECRET", key)
    code = "import os, time; print('token', os.environ['FAKE_SECRET'], flush=True); time.sleep(30)"
    with pytest.raises(UserError, match=r"timed out after 5 s .*token \*\*\*") as err:
        run_kaggle(["-c", code], [key], timeout=5)
    assert key not in str(err.value)


# ---- the real kaggle CLI against a fake Kaggle -----------------------------------------------


@pytest.mark.timeout(60)
def test_submit_uploads_the_file_and_the_cv(fake_kaggle, cfg, key, caplog):
    path = write(Path(cfg.ensemble.output), csv_text(good_rows()))
    write(path.with_suffix(".json"), json.dumps({"method": "rank", "files": ["a.csv"],
                                                 "weights": [1.0], "cv_auc": 0.93456}))
    with caplog.at_level(logging.INFO):
        sent = submit(cfg, "b5 512")

    start, = fake_kaggle.calls("/StartSubmissionUpload")
    assert start.json() == {"competitionName": COMPETITION, "fileName": "ensemble.csv",
                            "contentLength": path.stat().st_size,
                            "lastModifiedEpochSeconds": int(path.stat().st_mtime)}
    put, = [r for r in fake_kaggle.requests if r.method == "PUT"]
    assert put.body == path.read_bytes()
    assert "Authorization" not in put.headers  # the blob upload carries no Kaggle credentials
    create, = fake_kaggle.calls("/CreateSubmission")
    body = create.json()
    assert body["competitionName"] == COMPETITION
    assert body["blobFileTokens"] == put.path.rsplit("/", 1)[1]
    assert body["submissionDescription"] == sent
    assert sent.startswith("b5 512 | cv=0.9346 | ")
    basic = base64.b64encode(f"testuser:{key}".encode()).decode()
    assert create.headers["Authorization"] == f"Basic {basic}"
    assert f"Successfully submitted to {COMPETITION}" in caplog.text
    assert key not in caplog.text and basic not in caplog.text


@pytest.mark.timeout(60)
def test_bad_file_never_reaches_kaggle(fake_kaggle, cfg):
    write(Path(cfg.ensemble.output), csv_text(good_rows()[1:]))
    with pytest.raises(SubmissionError, match="ISIC_0000"):
        submit(cfg, "b5")
    assert fake_kaggle.requests == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("endpoint", ["StartSubmissionUpload", "CreateSubmission"])
def test_cli_failure_is_a_user_error_without_the_key(fake_kaggle, cfg, key, endpoint, caplog, capsys):
    write(Path(cfg.ensemble.output), csv_text(good_rows()))
    fake_kaggle.fail(endpoint, status=500, echo_credentials=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(UserError) as err:
        submit(cfg, "b5")
    message = str(err.value)
    assert "failed (exit 1)" in message and f"fake Kaggle refused {endpoint} for testuser:***" in message
    basic = base64.b64encode(f"testuser:{key}".encode()).decode()
    everything = message + caplog.text + "".join(capsys.readouterr())
    assert key not in everything and basic not in everything


def _weighted_json(cfg: Config, experiments: list[str]) -> None:
    groups = [{"experiment": e, "view": "identity", "folds": [0], "files": [], "weight": 1.0}
              for e in experiments]
    write(Path(cfg.ensemble.output).with_suffix(".json"), json.dumps(
        {"method": "weighted", "files": [], "weights": [], "cv_auc": 0.99, "cv_auc_rows": "2020",
         "cv_auc_all": 0.98, "cv_auc_source": "oof_in_sample", "groups": groups}))


def test_message_never_quotes_an_in_sample_cv(cfg):
    _weighted_json(cfg, ["exp1"])
    assert "| cv=n/a |" in submission_message(cfg, "b5")
    write(cfg.run_dir / "cv.json", json.dumps({"oof_auc": 0.85}))  # written before cv_auc
    assert "| cv=0.8500 |" in submission_message(cfg, "b5")
    write(cfg.run_dir / "cv.json", json.dumps(
        {"oof_auc": 0.85, "oof_auc_2020": 0.83, "cv_auc": 0.83, "cv_auc_metric": "oof_auc_2020"}))
    assert "| cv=0.8300 |" in submission_message(cfg, "b5")


def test_in_sample_cv_of_several_runs_is_not_replaced_by_one_runs(cfg):
    write(cfg.run_dir / "cv.json", json.dumps({"oof_auc": 0.85, "cv_auc": 0.83}))
    _weighted_json(cfg, ["exp1", "exp2"])
    assert "| cv=n/a |" in submission_message(cfg, "b5")


def test_message_quotes_the_runs_headline_cv_without_an_ensemble(cfg):
    write(cfg.run_dir / "cv.json", json.dumps({"oof_auc": 0.85, "cv_auc": 0.83}))
    assert "| cv=0.8300 |" in submission_message(cfg, "b5")
