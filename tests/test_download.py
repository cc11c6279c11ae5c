"""`make download`: the kaggle command lines, extraction via a temporary folder, the rerun marker, and
the duplicates list written from the 512-px set; the real kaggle CLI against a fake Kaggle."""

import io
import logging
import threading
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import Config, DataConfig, ExternalConfig, load_config
from pipeline.download import (
    EXTERNAL_DATASET,
    JPEG_DATASET,
    UNKNOWN_ORIGINAL,
    archive_name,
    config_mismatches,
    download,
    extract,
    fetch_dataset,
    write_duplicates,
)
from pipeline.merge import merge_tables
from pipeline.submit import CredentialsError, KaggleCredentials
from tests.conftest import REPO
from tests.fake_kaggle import COMPETITIONS, FakeKaggle, _handler_for

COMPETITION = "siim-isic-melanoma-classification"
CSVS = ("train.csv", "test.csv", "sample_submission.csv")
JPEG_TRAIN_CSV = ("image_name,patient_id,target,tfrecord\n"
                  "ISIC_1,IP_1,0,0\nISIC_2,IP_1,0,-1\nISIC_3,IP_2,1,4\nISIC_4,IP_2,0,-1\n")
JPEG_FILES = {"train.csv": JPEG_TRAIN_CSV, "test.csv": "image_name\nISIC_9\n",
              "train/ISIC_1.jpg": "a", "test/ISIC_9.jpg": "b"}
EXTERNAL_FILES = {"train.csv": "image_name,target\nISIC_0000000,0\n",
                  "train/ISIC_0000000.jpg": "c"}
LAYOUT = ["train.csv", "test.csv", "sample_submission.csv", "jpeg512/train.csv",
          "jpeg512/train/ISIC_1.jpg", "jpeg512/test/ISIC_9.jpg", "external/train.csv",
          "external/train/ISIC_0000000.jpg"]


def zip_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def config_in(tmp_path: Path) -> Config:
    cfg = Config()
    cfg.data.train_csv = str(tmp_path / "data" / "train.csv")
    cfg.data.duplicates_csv = str(tmp_path / "data" / "dups.csv")
    return cfg


def assert_layout(data: Path) -> None:
    for name in LAYOUT:
        assert (data / name).is_file(), name
    assert not list(data.rglob("*.zip")) and not (data / ".download").exists()
    assert not [p for p in data.iterdir() if p.name.endswith((".partial", ".old"))]


# ---- command lines, with the CLI replaced by a stand-in ----------------------------------------


class StandInCli:
    """Records each `kaggle` command and writes what the real CLI would into its `-p` folder."""

    def __init__(self, zipped: tuple[str, ...] = ("test.csv",)):
        self.commands: list[list[str]] = []
        self.zipped = zipped  # served wrapped in <name>.zip, as Kaggle does for large files

    def __call__(self, args, secrets, echo=False, timeout=None) -> str:
        self.commands.append(list(args))
        folder = Path(args[args.index("-p") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        if args[0] == "competitions":
            name = args[args.index("-f") + 1]
            text = f"{name} contents\n"
            if name in self.zipped:
                (folder / f"{name}.zip").write_bytes(zip_bytes({name: text}))
            else:
                (folder / name).write_text(text)
        else:
            dataset = args[args.index("-d") + 1]
            files = JPEG_FILES if dataset == JPEG_DATASET else EXTERNAL_FILES
            (folder / archive_name(dataset)).write_bytes(zip_bytes(files))
        return ""


@pytest.fixture
def cli(monkeypatch) -> StandInCli:
    stand_in = StandInCli()
    monkeypatch.setattr("pipeline.download.run_kaggle", stand_in)
    monkeypatch.setattr("pipeline.download.find_kaggle_credentials",
                        lambda: KaggleCredentials("test", ("secret",)))
    return stand_in


def test_download_runs_these_commands_and_skips_what_is_done(cli, tmp_path):
    cfg = config_in(tmp_path)
    data = download(cfg)

    staging = str(tmp_path / "data" / ".download")
    assert cli.commands == [
        *[["competitions", "download", "-c", COMPETITION, "-f", name, "-p", staging]
          for name in CSVS],
        ["datasets", "download", "-d", "cdeotte/jpeg-melanoma-512x512", "-p", staging],
        ["datasets", "download", "-d", "cdeotte/jpeg-isic2019-512x512", "-p", staging],
    ]
    assert data == tmp_path / "data"
    assert_layout(data)
    assert (data / "test.csv").read_text() == "test.csv contents\n"  # unwrapped from its zip
    assert (data / "jpeg512" / ".jpeg-melanoma-512x512.zip.complete").is_file()

    download(cfg)
    assert len(cli.commands) == 5

    (data / "dups.csv").write_text("image_name_1,image_name_2\nISIC_1,ISIC_3\n")
    download(cfg, force=True)
    assert len(cli.commands) == 10
    assert_layout(data)
    assert (data / "dups.csv").read_text() == "image_name_1,image_name_2\nISIC_1,ISIC_3\n"


def test_the_merged_set_is_downloaded_instead_of_the_two_jpeg_sets(cli, tmp_path):
    cfg = load_config(REPO / "configs" / "merged512_b5.yaml", [
        f"data.train_csv={tmp_path}/data/train.csv",
        f"data.merged.csv={tmp_path}/data/merged/marking.csv"])
    download(cfg)
    staging = str(tmp_path / "data" / ".download")
    assert cli.commands[-1] == ["datasets", "download", "-d",
                                "shonenkov/melanoma-merged-external-data-512x512-jpeg", "-p", staging]
    assert len(cli.commands) == 4  # the three competition CSVs, then the merged set
    assert (tmp_path / "data" / "merged" / ".melanoma-merged-external-data-512x512-jpeg.zip.complete").is_file()


def test_a_failed_csv_download_leaves_no_final_file(cli, tmp_path, monkeypatch):
    def killed(args, secrets, echo=False, timeout=None):
        folder = Path(args[args.index("-p") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.csv").write_text("image_name,tar")  # cut short
        raise UserError("`kaggle competitions download` failed (exit 1): connection reset")

    monkeypatch.setattr("pipeline.download.run_kaggle", killed)
    with pytest.raises(UserError, match="connection reset.*rules"):
        download(config_in(tmp_path))
    assert not (tmp_path / "data" / "train.csv").exists()


def test_a_folder_without_marker_is_not_overwritten_unless_forced(cli, tmp_path):
    cfg = config_in(tmp_path)
    mine = tmp_path / "data" / "jpeg512" / "train" / "mine.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_text("x")
    with pytest.raises(UserError, match=r"jpeg512 exists .*--force"):
        download(cfg)
    assert [c[3] for c in cli.commands if c[0] == "datasets"] == []
    download(cfg, force=True)
    assert not mine.exists()
    assert_layout(tmp_path / "data")


def test_download_without_credentials(clean_env, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.download.run_kaggle", lambda *a, **k: pytest.fail("CLI was run"))
    with pytest.raises(CredentialsError):
        download(Config())


# ---- extraction --------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path) -> Path:
    path = tmp_path / "set.zip"
    path.write_bytes(zip_bytes({"train.csv": "x\n", "train/A.jpg": "a" * 1000,
                                "test/B.jpg": "b", "../escape.txt": "no"}))
    return path


def test_extract_writes_the_layout_with_its_marker(archive, tmp_path):
    dest = tmp_path / "out" / "jpeg512"
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "stale.jpg").write_text("old")
    assert extract(archive, dest) == 4
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        ".set.zip.complete", "escape.txt", "test/B.jpg", "train.csv", "train/A.jpg"]
    assert (dest / "train" / "A.jpg").read_text() == "a" * 1000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["jpeg512"]


def test_a_failed_extraction_leaves_no_partial_file_in_place(archive, tmp_path, monkeypatch):
    real_extract = zipfile.ZipFile.extract

    def disk_full(self, member, path=None, pwd=None):
        if member.filename == "train/A.jpg":
            target = Path(path) / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("a" * 10)  # truncated
            raise OSError(28, "No space left on device")
        return real_extract(self, member, path, pwd)

    dest = tmp_path / "out" / "jpeg512"
    monkeypatch.setattr(zipfile.ZipFile, "extract", disk_full)
    with pytest.raises(OSError, match="No space"):
        extract(archive, dest)
    assert list(dest.parent.iterdir()) == []

    dest.mkdir()
    (dest / "kept.jpg").write_text("whole")
    with pytest.raises(OSError):
        extract(archive, dest)
    assert [p.name for p in dest.parent.iterdir()] == ["jpeg512"]
    assert [p.name for p in dest.iterdir()] == ["kept.jpg"]

    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    (dest.parent / ".jpeg512.partial" / "train").mkdir(parents=True)  # left by a killed run
    (dest.parent / ".jpeg512.partial" / "train" / "A.jpg").write_text("a" * 10)
    extract(archive, dest)
    assert (dest / "train" / "A.jpg").read_text() == "a" * 1000
    assert [p.name for p in dest.parent.iterdir()] == ["jpeg512"]


def test_an_interrupted_extraction_is_redone_from_the_kept_zip(cli, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extract", interrupted)
    creds = KaggleCredentials("test", ())
    dest = tmp_path / "data" / "jpeg512"
    with pytest.raises(KeyboardInterrupt):
        fetch_dataset(JPEG_DATASET, dest, creds)
    assert not dest.exists()
    assert (tmp_path / "data" / ".download" / "jpeg-melanoma-512x512.zip").is_file()
    monkeypatch.undo()
    monkeypatch.setattr("pipeline.download.run_kaggle", cli)
    fetch_dataset(JPEG_DATASET, dest, creds)
    assert (dest / "train" / "ISIC_1.jpg").is_file()
    assert not (tmp_path / "data" / ".download" / "jpeg-melanoma-512x512.zip").exists()


def test_a_bad_zip_is_a_user_error(tmp_path):
    bad = tmp_path / "set.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a valid zip archive"):
        extract(bad, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [bad]


# ---- the duplicates list -----------------------------------------------------------------------


def test_duplicates_from_tfrecord_minus_one_are_dropped_by_merge(tmp_path):
    jpeg_csv = tmp_path / "jpeg512" / "train.csv"
    jpeg_csv.parent.mkdir()
    jpeg_csv.write_text(JPEG_TRAIN_CSV)
    data = DataConfig(train_csv=str(jpeg_csv), train_images=str(tmp_path / "jpeg512" / "train"),
                      duplicates_csv=str(tmp_path / "dups.csv"), check_images=False)
    assert write_duplicates(jpeg_csv, Path(data.duplicates_csv), data.columns) == 2
    pairs = pd.read_csv(data.duplicates_csv, keep_default_na=False)
    assert list(pairs.columns) == ["image_name_1", "image_name_2"]
    assert list(pairs["image_name_2"]) == ["ISIC_2", "ISIC_4"]
    assert set(pairs["image_name_1"]) == {UNKNOWN_ORIGINAL}
    assert list(merge_tables(data)["image_name"]) == ["ISIC_1", "ISIC_3"]


def test_no_duplicates_marked_writes_nothing(tmp_path, caplog):
    jpeg_csv = tmp_path / "train.csv"
    jpeg_csv.write_text("image_name,tfrecord\nISIC_1,0\n")
    with caplog.at_level(logging.WARNING):
        assert write_duplicates(jpeg_csv, tmp_path / "dups.csv", DataConfig().columns) == 0
    assert not (tmp_path / "dups.csv").exists() and "tfrecord == -1" in caplog.text


def test_real_512_list_covers_the_official_duplicates(real_data, tmp_path):
    out = tmp_path / "dups.csv"
    n = write_duplicates(real_data / "train_cdeotte_jpeg-melanoma_tfrecord_folds.csv", out,
                         DataConfig().columns)
    ours = set(pd.read_csv(out)["image_name_2"])
    official = pd.read_csv(real_data / "ISIC_2020_Training_Duplicates.csv")
    assert n == len(ours) == 434
    assert set(official["image_name_2"]) - set(official["image_name_1"]) <= ours
    assert not ours & set(official["image_name_1"])


# ---- the config reads what download writes -----------------------------------------------------


def test_the_real_config_reads_the_download_layout():
    cfg = load_config(REPO / "configs" / "effnet_b5_512.yaml")
    assert config_mismatches(cfg, Path("data")) == []
    assert Path(cfg.data.duplicates_csv).parent == Path("data")
    # the defaults read the downloaded 2020 images; only the external set must be configured
    mismatches = config_mismatches(Config(), Path("data"))
    assert len(mismatches) == 1
    assert mismatches[0].startswith("no data.external entry reads data/external/train.csv")


# ---- the real kaggle CLI against a fake Kaggle -------------------------------------------------


class FakeKaggleWithFiles(FakeKaggle):
    """FakeKaggle that also answers `competitions download -f <name>` (DownloadDataFile) with a
    redirect to `/files/<name>`, or to `/files/<name>.zip` when only the zip is served."""

    def start(self) -> "FakeKaggleWithFiles":
        fake = self

        class Handler(_handler_for(self)):
            def _route(self, request):
                if request.method == "POST" and request.path == COMPETITIONS + "DownloadDataFile":
                    name = request.json().get("fileName", "")
                    served = name if name in fake.files else f"{name}.zip"
                    return self._send(302, b"", {"Location": f"http://localhost/files/{served}"})
                return super()._route(request)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self


@pytest.fixture
def fake_files(fake_kaggle, monkeypatch):
    """`fake_kaggle`'s credentials and environment, pointed at a FakeKaggleWithFiles instead."""
    with FakeKaggleWithFiles() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.mark.timeout(60)
def test_the_real_cli_downloads_files_and_data_sets(fake_files, tmp_path, key, capsys):
    fake_files.serve_file("train.csv", b"image_name,target\nISIC_1,0\n")
    fake_files.serve_file("test.csv.zip", zip_bytes({"test.csv": "image_name\nISIC_9\n"}))
    fake_files.serve_file("sample_submission.csv", b"image_name,target\nISIC_9,0\n")
    for dataset, files in ((JPEG_DATASET, JPEG_FILES), (EXTERNAL_DATASET, EXTERNAL_FILES)):
        fake_files.serve_file(archive_name(dataset), zip_bytes(files))
    cfg = config_in(tmp_path)
    data = download(cfg)

    assert_layout(data)
    assert (data / "test.csv").read_text() == "image_name\nISIC_9\n"
    assert [r.json() for r in fake_files.calls("/DownloadDataFile")] == [
        {"competitionName": COMPETITION, "fileName": name} for name in CSVS]
    assert fake_files.calls("/DownloadDataFiles") == []  # never the whole 108 GB archive
    assert [r.json()["datasetSlug"] for r in fake_files.calls("/DownloadDataset")] == [
        "jpeg-melanoma-512x512", "jpeg-isic2019-512x512"]
    assert list(pd.read_csv(data / "dups.csv")["image_name_2"]) == ["ISIC_2", "ISIC_4"]
    assert key not in "".join(capsys.readouterr())

    n_requests = len(fake_files.requests)
    download(cfg)
    assert len(fake_files.requests) == n_requests


@pytest.mark.timeout(60)
def test_download_failure_hints_at_the_rules(fake_kaggle, tmp_path):
    fake_kaggle.fail("DownloadDataFile", status=403)
    with pytest.raises(UserError, match=f"failed .*competitions/{COMPETITION}/rules"):
        download(config_in(tmp_path))
    assert not (tmp_path / "data" / "train.csv").exists()


# ---- ISIC's lesion table over HTTP (a server on 127.0.0.1) ----------------------------------------


@pytest.fixture
def http_file(tmp_path):
    """Serves tmp_path/www over http://127.0.0.1:<port>/ for the duration of a test."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    root = tmp_path / "www"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.timeout(60)
def test_lesion_table_fetched_when_absent_and_never_replaced(http_file, tmp_path, monkeypatch):
    from pipeline.download import fetch_lesion_tables
    root, base = http_file
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    (root / "meta.csv").write_text("image,lesion_id,gender\nISIC_1,L1,male\n")
    monkeypatch.setattr("pipeline.download.LESIONS_URL", f"{base}/meta.csv")
    cfg = Config()
    target = tmp_path / "data" / "external" / "ISIC_2019_Training_Metadata.csv"
    cfg.data.external = [ExternalConfig(lesions_csv=str(target))]
    fetch_lesion_tables(cfg)
    assert target.read_text() == "image,lesion_id,gender\nISIC_1,L1,male\n"
    target.write_text("image,lesion_id\nmine,L\n")
    fetch_lesion_tables(cfg)
    assert target.read_text() == "image,lesion_id\nmine,L\n"  # a user's copy stays
    monkeypatch.setattr("pipeline.download.LESIONS_URL", f"{base}/absent.csv")
    with pytest.raises(UserError, match=r"cannot download .*absent.csv to .*ISIC_2019_Training_Metadata.csv"):
        fetch_lesion_tables(cfg, force=True)
    assert target.read_text() == "image,lesion_id\nmine,L\n"  # nothing half-written
    assert [p.name for p in target.parent.iterdir()] == [target.name]
