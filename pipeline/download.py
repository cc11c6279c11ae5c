"""Fetch the competition CSVs and the 512-px JPEG re-encodes with the kaggle CLI, then unzip.

Everything lands in the folder of `data.train_csv` (`data/` in the real configs), in the layout
`configs/effnet_b5_512.yaml` reads (see `expected_paths`):
- `train.csv`, `test.csv`, `sample_submission.csv`: one `kaggle competitions download -f` each. The
  whole competition archive (about 108 GB of DICOMs, TFRecords and full-size JPEGs that are slow to
  decode) is never fetched;
- JPEG_DATASET into `jpeg512/` (`train/`, `test/`, and its own `train.csv` whose tfrecord == -1 marks
  duplicates: `data.duplicates_csv` is written from it when absent, see `write_duplicates`);
- EXTERNAL_DATASET into `external/` (`train.csv`, `train/`);
- with `data.merged` set instead of the two JPEG sets: that merged data set (marking.csv, the
  train and test JPEGs) into the folder of `data.merged.csv`;
- ISIC's `ISIC_2019_Training_Metadata.csv` (LESIONS_URL, the challenge's own file) to where a
  `data.external[].lesions_csv` names it, when absent: its lesion ids group the external images.

Nothing appears under a final name until it is whole: the CLI downloads into a staging folder
`.download/`, single files are moved into place, and each data set is extracted into a hidden
sibling folder that is renamed into place with its marker `.<archive name>.complete` inside. A rerun
skips what is in place (`force=True` fetches again); an interrupted download is resumed by the CLI.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
import zipfile
from contextlib import suppress
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_path, atomic_write_csv
from pipeline.config import ColumnsConfig, Config
from pipeline.errors import UserError
from pipeline.submit import KaggleCredentials, find_kaggle_credentials, run_kaggle
from pipeline.tables import read_csv

log = logging.getLogger(__name__)

COMPETITION_FILES = ("train.csv", "test.csv", "sample_submission.csv")
# Chris Deotte's 2020 JPEGs resized to 512x512: `train.csv` (the 2020 columns plus tfrecord, width,
# height), `test.csv`, `train/<image_name>.jpg`, `test/<image_name>.jpg`.
JPEG_DATASET = "cdeotte/jpeg-melanoma-512x512"
# His ISIC 2019 (incl. 2018/2017) images at 512x512, the external data of the 1st-place solution:
# `train.csv` (2020-style columns: image_name, patient_id (-1), sex, age_approx,
# anatom_site_general_challenge, diagnosis, benign_malignant, target, tfrecord, width, height) and
# `train/<image_name>.jpg`.
EXTERNAL_DATASET = "cdeotte/jpeg-isic2019-512x512"
# ISIC's own metadata of the 2019 training images (image, age, site, lesion_id, sex): the 512-px
# re-encode has no lesion ids, so the images of one lesion are found through this file.
LESIONS_URL = "https://isic-challenge-data.s3.amazonaws.com/2019/ISIC_2019_Training_Metadata.csv"
JPEG_DIR = "jpeg512"
EXTERNAL_DIR = "external"
STAGING_DIR = ".download"
# The 512-px set marks duplicates but not which image each one duplicates (see write_duplicates).
UNKNOWN_ORIGINAL = "unknown"


def archive_name(dataset: str) -> str:
    """The zip `kaggle datasets download -d owner/name` writes: `name.zip`."""
    return f"{dataset.split('/')[1]}.zip"


def marker_path(folder: Path, archive: str) -> Path:
    return folder / f".{archive}.complete"


def _run(args: list[str], credentials: KaggleCredentials, hint: str = "") -> None:
    try:
        run_kaggle(args, credentials.secrets, echo=True)
    except UserError as err:
        raise UserError(f"{err}{hint}") from None


def _unwrap(archive: Path, dest: Path) -> None:
    """Write the one member of `archive` (the CLI's wrapper around a large single file) to `dest`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise UserError(f"{archive}: expected one file inside, found {len(members)}")
            with zf.open(members[0]) as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    except zipfile.BadZipFile:
        raise UserError(f"{archive}: not a valid zip archive; delete it and download again") from None


def fetch_competition_file(slug: str, name: str, dest: Path, credentials: KaggleCredentials,
                           force: bool = False) -> Path:
    """`kaggle competitions download -f name` into the staging folder, then moved whole to `dest`."""
    if dest.is_file() and not force:  # only ever renamed into place, so present means complete
        log.info("%s already downloaded; skipping", dest)
        return dest
    staging = dest.parent / STAGING_DIR
    _run(["competitions", "download", "-c", slug, "-f", name, "-p", str(staging)], credentials,
         hint=f" (a 403 means the rules are not accepted yet: "
              f"https://www.kaggle.com/competitions/{slug}/rules)")
    plain, zipped = staging / name, staging / f"{name}.zip"  # large files come zipped
    if plain.is_file():
        os.replace(plain, dest)
    elif zipped.is_file():
        _unwrap(zipped, dest)
        zipped.unlink()
    else:
        raise UserError(f"`kaggle competitions download -f {name}` succeeded but neither {plain} "
                        f"nor {zipped} is there")
    log.info("downloaded %s", dest)
    return dest


def extract(archive: Path, dest: Path) -> int:
    """Extract all of `archive` into the folder `dest`, whole or not at all; return how many files.

    Members go to a hidden sibling folder, together with the marker `.<archive>.complete`; only
    then is it renamed to `dest` (an older `dest` is moved aside first and deleted after). A killed
    extraction leaves only that sibling, which the next call deletes.
    """
    partial = dest.with_name(f".{dest.name}.partial")
    old = dest.with_name(f".{dest.name}.old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            for member in members:
                zf.extract(member, partial)  # zipfile drops absolute and '..' parts of names
        marker_path(partial, archive.name).write_text(f"{len(members)} files from {archive.name}\n")
    except zipfile.BadZipFile:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"{archive}: not a valid zip archive; delete it and download again") from None
    except BaseException:  # a full disk, an interrupt: free the space, leave nothing behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.exists():
        os.replace(dest, old)
    os.replace(partial, dest)
    shutil.rmtree(old, ignore_errors=True)
    return len(members)


def fetch_dataset(dataset: str, dest: Path, credentials: KaggleCredentials,
                  force: bool = False) -> Path:
    """`kaggle datasets download -d dataset` into the staging folder, extracted to `dest`, zip dropped."""
    archive = dest.parent / STAGING_DIR / archive_name(dataset)
    marker = marker_path(dest, archive.name)
    if marker.is_file() and not force:
        log.info("%s already downloaded and extracted (%s); skipping", dataset, marker)
        return dest
    if dest.exists() and not force:
        raise UserError(f"{dest} exists but holds no complete download of {dataset} ({marker.name} "
                        f"is missing): delete it, or download again with --force to replace it")
    _run(["datasets", "download", "-d", dataset, "-p", str(archive.parent)], credentials)
    if not archive.is_file():
        raise UserError(f"`kaggle datasets download -d {dataset}` succeeded but {archive} is not there")
    n = extract(archive, dest)
    log.info("extracted %d file(s) from %s into %s", n, archive.name, dest)
    archive.unlink()
    return dest


def write_duplicates(jpeg_train_csv: Path, out: Path, c: ColumnsConfig) -> int:
    """The duplicates list from the 512-px set's train.csv (tfrecord == -1); return its length.

    ISIC's own list pairs each duplicate (image_name_2) with the image it repeats (image_name_1);
    the 512-px set only marks the duplicate. `pipeline.merge.drop_duplicates` drops
    `set(image_name_2) - set(image_name_1)`, so image_name_1 holds UNKNOWN_ORIGINAL, a name no
    image has: every marked image is dropped, and none of the images they repeat.
    """
    df = read_csv(jpeg_train_csv, [c.image, "tfrecord"])
    dups = df.loc[pd.to_numeric(df["tfrecord"], errors="coerce") == -1, c.image]
    if dups.empty:
        log.warning("%s: no rows with tfrecord == -1; %s not written", jpeg_train_csv, out)
        return 0
    atomic_write_csv(pd.DataFrame({c.dup_image: UNKNOWN_ORIGINAL, c.dup_other: dups.to_numpy()}), out)
    log.info("wrote %d duplicate image name(s) from %s to %s", len(dups), jpeg_train_csv, out)
    return len(dups)


def fetch_url(url: str, dest: Path, timeout: float = 120) -> None:
    """Download `url` to `dest`, whole or not at all; an error names the URL and the file."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(dest) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
    except OSError as err:  # URLError and HTTPError are OSErrors
        raise UserError(f"cannot download {url} to {dest}: {err}; put the file there by hand "
                        "(it is ISIC's ISIC_2019_Training_Metadata.csv)") from None
    log.info("downloaded %s to %s", url, dest)


def fetch_lesion_tables(cfg: Config, force: bool = False) -> None:
    """ISIC's 2019 metadata for each external set whose `lesions_csv` is missing (never replaced
    unless forced: a user's own copy stays)."""
    for ext in cfg.data.external:
        if ext.lesions_csv and (force or not Path(ext.lesions_csv).is_file()):
            fetch_url(LESIONS_URL, Path(ext.lesions_csv))


def expected_paths(data_dir: Path) -> dict[str, Path]:
    """What `download` writes into `data_dir`, by the `data` key that should read it."""
    return {
        "train_csv": data_dir / "train.csv",
        "test_csv": data_dir / "test.csv",
        "sample_submission": data_dir / "sample_submission.csv",
        "train_images": data_dir / JPEG_DIR / "train",
        "test_images": data_dir / JPEG_DIR / "test",
    }


def config_mismatches(cfg: Config, data_dir: Path) -> list[str]:
    """The `data` paths of `cfg` that do not read what `download` wrote into `data_dir`."""
    out = [f"data.{key}={getattr(cfg.data, key)} (downloaded to {path})"
           for key, path in expected_paths(data_dir).items()
           if Path(getattr(cfg.data, key)) != path]
    gt, images = data_dir / EXTERNAL_DIR / "train.csv", data_dir / EXTERNAL_DIR / "train"
    if not any(Path(e.ground_truth_csv) == gt and Path(e.images) == images
               for e in cfg.data.external):
        out.append(f"no data.external entry reads {gt} with images {images}")
    return out


def download(cfg: Config, force: bool = False) -> Path:
    """Competition CSVs, JPEG_DATASET and EXTERNAL_DATASET into the folder of `cfg.data.train_csv`."""
    credentials = find_kaggle_credentials()
    data_dir = Path(cfg.data.train_csv).parent
    for name in COMPETITION_FILES:
        fetch_competition_file(cfg.submit.competition, name, data_dir / name, credentials, force)
    if cfg.data.merged is not None:  # the blog's merged 512-px set: one CSV, train and test JPEGs
        dest = Path(cfg.data.merged.csv).parent
        fetch_dataset(cfg.data.merged.dataset, dest, credentials, force)
        with suppress(OSError):  # the CLI's staging folder, beside the data set
            (dest.parent / STAGING_DIR).rmdir()
        return data_dir
    fetch_dataset(JPEG_DATASET, data_dir / JPEG_DIR, credentials, force)
    fetch_dataset(EXTERNAL_DATASET, data_dir / EXTERNAL_DIR, credentials, force)
    fetch_lesion_tables(cfg, force)
    with suppress(OSError):  # the CLI's staging folder, once everything has left it
        (data_dir / STAGING_DIR).rmdir()
    duplicates = cfg.data.duplicates_csv
    if duplicates and not Path(duplicates).is_file():  # never overwrite ISIC's own list
        write_duplicates(data_dir / JPEG_DIR / "train.csv", Path(duplicates), cfg.data.columns)
    for mismatch in config_mismatches(cfg, data_dir):
        log.warning("the config does not read the download: %s", mismatch)
    return data_dir
