"""A stand-in for the Kaggle API on 127.0.0.1, so tests can run the real `kaggle` CLI offline.

The CLI talks to `http://localhost/api/v1/<Service>/<Method>` when KAGGLE_API_ENVIRONMENT=LOCALHOST.
Setting HTTP_PROXY to this server sends every request here whatever port it listens on; through a
proxy the request line holds the absolute URL, so routing uses the path parsed out of it.

What the CLI (kaggle 2.x, kagglesdk) does, and what this server answers:
- JSON `POST .../competitions.CompetitionApiService/StartSubmissionUpload` -> {"token", "createUrl"};
- `PUT <createUrl>` with the file's bytes (a plain requests session: no Kaggle auth) -> 200;
- JSON `POST .../CreateSubmission` {"competitionName", "blobFileTokens", "submissionDescription"}
  -> {"message", "ref"}; the new submission joins the listing, scored as `score_next` says;
- `POST .../ListSubmissions` {"competitionName", "page", "pageToken"} (sortBy, group, pageSize
  only where not the defaults; `kaggle competitions submissions`) -> {"submissions": [ApiSubmission, newest first],
  "nextPageToken": ""}; an ApiSubmission is {"ref", "date", "description", "fileName", "status"
  (PENDING | COMPLETE | ERROR), "publicScore", "privateScore", "errorDescription", ...}, the
  optional ones left out while unset; each listing counts down a pending submission's
  `pending_polls`;
- `POST .../GetSubmission` {"ref"} (`kaggle competitions submission <ref>`) -> one ApiSubmission;
- `POST .../DownloadDataFiles` and `.../datasets.DatasetApiService/DownloadDataset` -> a 302 to
  `/files/<slug>.zip`, then `GET` of that file (a dataset download first asks GetDatasetMetadata
  for its licences).
Unknown endpoints answer 404 in Kaggle's error shape {"code", "message"}.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline.cli import UserError
from pipeline.submit import kaggle_executable

API = "/api/v1/"
COMPETITIONS = API + "competitions.CompetitionApiService/"
DATASETS = API + "datasets.DatasetApiService/"


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body or b"{}")


@dataclass
class Failure:
    status: int
    echo_credentials: bool


@dataclass
class FakeSubmission:
    """One submission as Kaggle lists it. It shows PENDING, without scores, for its first
    `pending_polls` listings, then `status` (COMPLETE or ERROR) with its scores or error."""

    ref: int
    description: str = ""
    file_name: str = "submission.csv"
    status: str = "COMPLETE"
    public_score: str | None = "0.9100"
    private_score: str | None = "0.9050"
    error: str | None = None
    pending_polls: int = 0
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")

    def wire(self) -> dict:
        """The ApiSubmission JSON: optional fields that are unset are left out, as Kaggle does."""
        pending = self.pending_polls > 0
        fields = {
            "ref": self.ref, "date": self.date, "description": self.description,
            "fileName": self.file_name, "status": "PENDING" if pending else self.status,
            "publicScore": None if pending else self.public_score,
            "privateScore": None if pending else self.private_score,
            "errorDescription": None if pending else self.error,
            "submittedBy": "testuser", "teamName": "testuser",
        }
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class FakeKaggle:
    """Records every request; answers the submit, submissions-listing and download calls; can fail
    any endpoint on demand."""

    requests: list[Recorded] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    submissions: list[FakeSubmission] = field(default_factory=list)  # newest first
    next_submission: FakeSubmission = field(default_factory=lambda: FakeSubmission(ref=4242))
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> FakeKaggle:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> FakeKaggle:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Variables that point the kaggle CLI at this server (NO_PROXY must also be unset)."""
        return {
            "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
            "HTTP_PROXY": self.proxy_url,
            "http_proxy": self.proxy_url,
        }

    def fail(self, endpoint: str, status: int = 500, echo_credentials: bool = False) -> None:
        """Answer `endpoint` (a method name such as "CreateSubmission") with an error.

        With `echo_credentials` the error message repeats the request's Authorization header, decoded,
        as a careless server might: the CLI then prints the key, and callers must redact it.
        """
        self.failures[endpoint] = Failure(status, echo_credentials)

    def serve_file(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def calls(self, suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith(suffix)]

    def score_next(self, **outcome) -> None:
        """How the next CreateSubmission turns out: FakeSubmission fields such as status="ERROR",
        error="...", public_score=..., pending_polls=N (listings it stays PENDING for)."""
        self.next_submission = replace(self.next_submission, **outcome)

    def add_submission(self, **fields) -> FakeSubmission:
        """List a submission made earlier (newest first, so it goes after those listed already)."""
        fields.setdefault("ref", max((s.ref for s in self.submissions), default=1000) + 1)
        submission = FakeSubmission(**fields)
        self.submissions.append(submission)
        return submission

    def submission(self, ref: int) -> FakeSubmission:
        return next(s for s in self.submissions if s.ref == ref)

    def _create(self, description: str, file_name: str) -> FakeSubmission:
        created = replace(self.next_submission, description=description, file_name=file_name)
        self.submissions.insert(0, created)
        self.next_submission = replace(self.next_submission, ref=created.ref + 1)
        return created

    def _list(self, page_size: int | None) -> list[dict]:
        shown = self.submissions[:page_size or 20]
        answer = [s.wire() for s in shown]
        for submission in shown:
            submission.pending_polls = max(submission.pending_polls - 1, 0)
        return answer


def _decoded_auth(header: str) -> str:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        return base64.b64decode(value).decode(errors="replace")
    return value


def _handler_for(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode())

        def _handle(self) -> None:
            path = urlsplit(self.path).path
            request = Recorded(self.command, path, dict(self.headers.items()), self._body())
            fake.requests.append(request)
            name = path.rsplit("/", 1)[-1]
            failure = fake.failures.get(name)
            if failure is not None:
                message = f"fake Kaggle refused {name}"
                if failure.echo_credentials:
                    message += f" for {_decoded_auth(request.headers.get('Authorization', ''))}"
                return self._json(failure.status, {"code": failure.status, "message": message})
            return self._route(request)

        def _route(self, request: Recorded) -> None:
            path = request.path
            if request.method == "POST" and path == COMPETITIONS + "StartSubmissionUpload":
                token = f"blob-token-{len(fake.requests)}"
                return self._json(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
            if request.method == "PUT" and path.startswith("/upload/"):
                return self._json(200, {})
            if request.method == "POST" and path == COMPETITIONS + "CreateSubmission":
                body = request.json()
                created = fake._create(body.get("submissionDescription", ""), self._upload_name())
                return self._json(200, {"message": f"Successfully submitted to {body.get('competitionName', '')}",
                                        "ref": created.ref})
            if request.method == "POST" and path == COMPETITIONS + "ListSubmissions":
                page = fake._list(request.json().get("pageSize"))
                return self._json(200, {"submissions": page, "nextPageToken": ""})
            if request.method == "POST" and path == COMPETITIONS + "GetSubmission":
                ref = request.json().get("ref")
                found = [s.wire() for s in fake.submissions if s.ref == ref]
                if found:
                    return self._json(200, found[0])
                return self._json(404, {"code": 404, "message": f"no submission {ref}"})
            if request.method == "POST" and path == COMPETITIONS + "GetSubmissionLimits":
                return self._json(200, {"numToday": 1, "numAllowedNow": 4})
            if request.method == "POST" and path == COMPETITIONS + "DownloadDataFiles":
                return self._redirect(request.json().get("competitionName", ""))
            if request.method == "POST" and path == DATASETS + "GetDatasetMetadata":
                return self._json(200, {"info": {"licenses": [{"name": "CC-BY-NC-4.0"}]}})
            if request.method == "POST" and path == DATASETS + "DownloadDataset":
                return self._redirect(request.json().get("datasetSlug", ""))
            if request.method == "GET" and path.startswith("/files/"):
                data = fake.files.get(path.removeprefix("/files/"))
                if data is not None:
                    return self._send(200, data, {"Content-Type": "application/zip"})
            return self._json(404, {"code": 404, "message": f"fake Kaggle has no {request.method} {path}"})

        def _upload_name(self) -> str:
            starts = fake.calls("/StartSubmissionUpload")
            return starts[-1].json().get("fileName", "") if starts else ""

        def _redirect(self, slug: str) -> None:
            self._send(302, b"", {"Location": f"http://localhost/files/{slug}.zip"})

        do_GET = do_POST = do_PUT = _handle

    return Handler


# ---- fixtures (registered for every test module through conftest's pytest_plugins) ----------


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> Path:
    """An empty HOME and no KAGGLE_* variables, so nothing of this machine's setup leaks in."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name in ("XDG_CONFIG_HOME", "VERBOSE", "VERBOSE_OUTPUT"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def key() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def fake_kaggle(clean_env, monkeypatch, key):
    """A fake Kaggle API on 127.0.0.1, the real CLI pointed at it, credentials testuser/<key>."""
    try:
        kaggle_executable()
    except UserError:
        pytest.skip("kaggle CLI not installed")
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(clean_env / ".kaggle"))
    monkeypatch.setenv("KAGGLE_USERNAME", "testuser")
    monkeypatch.setenv("KAGGLE_KEY", key)
    server = FakeKaggle().start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server
    finally:
        server.stop()
