"""Scores read back: the real kaggle CLI lists submissions from a fake Kaggle; scores.csv and `make scores`."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import Config
from pipeline.scores import (
    SCORES_COLUMNS,
    append_score,
    await_score,
    list_submissions,
    parse_error,
    parse_listing,
    read_scores,
    refresh_scores,
    scores_path,
)
from pipeline.submit import find_kaggle_credentials, submit
from tests.test_submit import COMPETITION, IDS, csv_text, good_rows, write

LISTING = "/ListSubmissions"


@pytest.fixture
def cfg(tmp_path) -> Config:
    """A checked ensemble with a CV of 0.93456 to submit; scores.csv under tmp_path."""
    cfg = Config(experiment="exp1", runs_dir=str(tmp_path / "runs"))
    cfg.data.sample_submission = str(write(tmp_path / "sample_submission.csv",
                                           csv_text([(i, 0) for i in IDS])))
    cfg.infer.submissions_dir = str(tmp_path / "submissions")
    cfg.ensemble.output = str(tmp_path / "submissions" / "ensemble.csv")
    path = write(Path(cfg.ensemble.output), csv_text(good_rows()))
    write(path.with_suffix(".json"), json.dumps({"method": "rank", "files": ["a.csv"],
                                                 "weights": [1.0], "cv_auc": 0.93456}))
    return cfg


@pytest.fixture
def others(fake_kaggle):
    """Earlier submissions on the fake's listing: one scored, one still pending, one errored."""
    fake_kaggle.add_submission(ref=1003, description="b3 | cv=0.9000 | abc1234",
                               public_score="0.9012", private_score="0.8990")
    fake_kaggle.add_submission(ref=1002, description="b4, wide | cv=0.9100 | abc1234",
                               pending_polls=10**6)
    fake_kaggle.add_submission(ref=1001, description="broken | cv=n/a | abc1234", status="ERROR",
                               public_score=None, private_score=None,
                               error="Submission must have 10982 rows")
    return fake_kaggle


def scores(cfg) -> pd.DataFrame:
    return read_scores(scores_path(cfg))


def waiting_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for Kaggle")]


# ---- the real CLI against the fake Kaggle ----------------------------------------------------


@pytest.mark.timeout(60)
def test_the_listing_reads_complete_pending_and_errored(others):
    listed = list_submissions(COMPETITION, find_kaggle_credentials().secrets)
    assert [(s.ref, s.status, s.public_score, s.private_score) for s in listed] == [
        ("1003", "complete", "0.9012", "0.8990"), ("1002", "pending", "", ""),
        ("1001", "error", "", "")]
    assert listed[1].description == "b4, wide | cv=0.9100 | abc1234"
    call, = others.calls(LISTING)
    assert call.json()["competitionName"] == COMPETITION


@pytest.mark.timeout(60)
def test_submit_reads_the_score_back(others, cfg, key, caplog):
    others.score_next(pending_polls=2, public_score="0.9411", private_score="0.9387")
    with caplog.at_level(logging.INFO):
        sent = submit(cfg, "b5 512", wait_s=30, poll_s=0.05)

    row = scores(cfg).iloc[0].to_dict()
    assert len(scores(cfg)) == 1
    assert row | {"time": ""} == {
        "time": "", "competition": COMPETITION, "file": cfg.ensemble.output, "message": sent,
        "experiment": "exp1", "cv_auc": "0.9346", "status": "complete", "public_score": "0.9411",
        "private_score": "0.9387", "ref": "4242"}
    assert pd.Timestamp(row["time"]).tzinfo is not None
    assert len(others.calls(LISTING)) == 3  # pending, pending, complete
    assert [line.split(": ", 1)[1].split(" after")[0] for line in waiting_lines(caplog)] == [
        "pending", "pending"]
    assert "submission 4242 of" in caplog.text
    assert "public score 0.9411, private 0.9387, cv 0.9346" in caplog.text
    assert key not in caplog.text


@pytest.mark.timeout(60)
def test_still_pending_after_the_limit_is_recorded_pending(others, cfg, caplog, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("pipeline.scores.time", clock)
    others.score_next(pending_polls=10**6)
    with caplog.at_level(logging.INFO):
        submit(cfg, "b5", wait_s=30, poll_s=10)

    assert clock.sleeps == [10, 10, 10]  # looks at 0, 10, 20 and 30 s, then no more
    assert len(others.calls(LISTING)) == 4
    lines = waiting_lines(caplog)
    assert len(lines) == 4 and "pending after 30 s (look 4, at most 30 s, every 10 s)" in lines[-1]
    row = scores(cfg).iloc[0]
    assert (row["status"], row["public_score"], row["private_score"], row["ref"]) == (
        "pending", "", "", "4242")
    warning, = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "still pending after 30 s" in warning.getMessage()
    assert "make scores" in warning.getMessage() and str(scores_path(cfg)) in warning.getMessage()


@pytest.mark.timeout(60)
def test_an_errored_submission_is_recorded_as_error(others, cfg, caplog):
    others.score_next(status="ERROR", public_score=None, private_score=None,
                      error="Submission contains 3 rows,\nexpected 10982")
    with caplog.at_level(logging.INFO):
        submit(cfg, "b5", wait_s=30, poll_s=0.05)

    row = scores(cfg).iloc[0]
    assert (row["status"], row["public_score"], row["ref"]) == ("error", "", "4242")
    error, = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "Kaggle could not score it: Submission contains 3 rows, expected 10982" in error.getMessage()
    assert [r.json() for r in others.calls("/GetSubmission")] == [{"ref": 4242}]


@pytest.mark.timeout(60)
def test_a_failed_listing_does_not_lose_the_row(fake_kaggle, cfg, caplog):
    fake_kaggle.fail("ListSubmissions", status=503)
    with caplog.at_level(logging.INFO):
        submit(cfg, "b5", wait_s=0, poll_s=10)
    assert scores(cfg)["status"].tolist() == ["pending"]
    assert "fake Kaggle refused ListSubmissions" in caplog.text


@pytest.mark.timeout(60)
def test_make_scores_updates_pending_rows(others, cfg, caplog):
    others.score_next(pending_polls=10**6)
    sent = submit(cfg, "b5", wait_s=0, poll_s=10)
    # a row recorded by kaggle 1.x, which printed no ref: found again by its message
    append_score(scores_path(cfg), {"time": "2020-08-01T00:00:00+00:00", "competition": COMPETITION,
                                    "message": "b4, wide | cv=0.9100 | abc1234", "status": "pending"})
    assert scores(cfg)["status"].tolist() == ["pending", "pending"]

    with caplog.at_level(logging.INFO):
        refresh_scores(cfg)  # still pending on Kaggle: nothing changes
    assert scores(cfg)["status"].tolist() == ["pending", "pending"]
    assert scores(cfg)["ref"].tolist() == ["4242", "1002"]  # the ref, once found, is kept

    others.submission(4242).pending_polls = 0
    errored = others.submission(1002)
    errored.status, errored.error, errored.pending_polls = "ERROR", "bad ids", 0
    errored.public_score = errored.private_score = None
    caplog.clear()
    with caplog.at_level(logging.INFO):
        table = refresh_scores(cfg)

    after = scores(cfg)
    assert after.equals(table[SCORES_COLUMNS])
    assert after[["message", "status", "public_score", "private_score", "ref"]].values.tolist() == [
        [sent, "complete", "0.9100", "0.9050", "4242"],
        ["b4, wide | cv=0.9100 | abc1234", "error", "", "", "1002"]]
    assert scores_path(cfg).read_text().count("time,competition") == 1
    assert "public score 0.9100, private 0.9050, cv 0.9346" in caplog.text
    assert "Kaggle could not score it: bad ids" in caplog.text
    assert "0.9050" in caplog.records[-1].getMessage()  # the table is logged last

    n_calls = len(others.requests)
    refresh_scores(cfg)  # nothing pending: Kaggle is not asked
    assert len(others.requests) == n_calls


def test_make_scores_without_a_table(cfg, caplog, clean_env):
    with caplog.at_level(logging.INFO):
        assert refresh_scores(cfg).empty
    assert "no submissions recorded yet" in caplog.text


# ---- the waiting loop, the CLI's output formats, the table -----------------------------------


class FakeClock:
    """Stands in for the `time` module inside pipeline.scores: sleeping advances it."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_await_stops_at_a_final_status_or_the_limit(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("pipeline.scores.time", clock)
    answers = iter(["pending", "not listed", "pending", "complete"])

    def listing(competition, secrets):
        status = next(answers)
        return [] if status == "not listed" else parse_listing(
            f"ref,fileName,date,description,status,publicScore,privateScore\n"
            f"7,e.csv,2020,m,SubmissionStatus.{status.upper()},0.9,\n")

    monkeypatch.setattr("pipeline.scores.list_submissions", listing)
    assert await_score("c", [], "7", "m", wait_s=600, poll_s=10).status == "complete"
    assert clock.sleeps == [10, 10, 10]
    answers = iter(["pending"] * 10)
    clock.sleeps.clear()
    assert await_score("c", [], "7", "m", wait_s=15, poll_s=10).status == "pending"
    assert clock.sleeps == [10]


def test_listing_formats_of_kaggle_1_and_2():
    v2 = ('Warning: Looks like you are using an outdated API version\n'
          'ref,fileName,date,description,status,publicScore,privateScore\n'
          '5,e.csv,2020-08-17 12:00:00,"a, ""quoted"" message",SubmissionStatus.COMPLETE,0.95,\n')
    listed, = parse_listing(v2)
    assert (listed.ref, listed.description, listed.status, listed.public_score,
            listed.private_score) == ("5", 'a, "quoted" message', "complete", "0.95", "")
    v1 = ("fileName,date,description,status,publicScore,privateScore\n"
          "e.csv,2020-08-17 12:00:00,m,pending,None,None\n")
    listed, = parse_listing(v1)
    assert (listed.ref, listed.status, listed.public_score) == ("", "pending", "")
    assert parse_listing("No submissions found\n") == []
    with pytest.raises(UserError, match="no submissions table: 403 - Forbidden"):
        parse_listing("403 - Forbidden\n")


def test_error_text_of_kaggle_competitions_submission():
    output = ("Submission Ref:  9\nStatus:          ERROR\nError:           3 rows,\n"
              "                 expected 10982\nPublic Score:    \n")
    assert parse_error(output) == "3 rows, expected 10982"
    assert parse_error("Submission Ref:  9\nStatus:          COMPLETE\n") == ""


def test_rows_are_whole_and_the_header_written_once(tmp_path, caplog):
    path = tmp_path / "scores.csv"
    append_score(path, {"message": 'b5, "x" | cv=0.9 | abc', "status": "pending"})
    with path.open("a") as f:
        f.write("2020-08-17,siim,half a ro")  # a writer killed mid-row
    append_score(path, {"message": "second", "status": "complete", "public_score": "0.9"})
    assert path.read_text().splitlines()[0] == ",".join(SCORES_COLUMNS)
    table = read_scores(path)
    assert table["message"].tolist() == ['b5, "x" | cv=0.9 | abc', "second"]
    assert "unfinished last line" in caplog.text
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not the scores header"):
        read_scores(path)


def test_a_wait_cut_short_leaves_a_pending_row_for_make_scores(tmp_path, monkeypatch):
    from pipeline.scores import Sent, track_submission

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.scores.await_score", interrupted)
    sent = Sent("2026-11-27T21:00:00+00:00", COMPETITION, "ensemble.csv", "m | cv=0.9 | abc", "e", 0.9, "77")
    with pytest.raises(KeyboardInterrupt):
        track_submission(sent, ["secret"], tmp_path / "scores.csv")
    table = read_scores(tmp_path / "scores.csv")
    assert list(table["status"]) == ["pending"] and list(table["ref"]) == ["77"]
