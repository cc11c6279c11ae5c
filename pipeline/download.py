"""Fetch the competition data and the external ISIC 2019 JPEGs with the kaggle CLI, then unzip.

Everything lands in the folder of `data.train_csv` (`data/` in the real configs):
- the competition archive (about 108 GB: DICOMs, full-size JPEGs, TFRecords). Only the CSVs and
  `jpeg/` are extracted, which is what the config reads: `train.csv`, `test.csv`,
  `sample_submission.csv`, `jpeg/train/`, `jpeg/test/`;
- EXTERNAL_DATASET into `external/`, whole.

Each archive is deleted once extracted, and a marker `.<archive name>.complete` is left so a second
run skips it (`force=True` fetches again). An interrupted run keeps the archive and the kaggle CLI
reuses it.
"""

from __future__ import annotations

import fnmatch
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import UserError
from pipeline.config import Config
from pipeline.submit import KaggleCredentials, find_kaggle_credentials, run_kaggle

log = logging.getLogger(__name__)

# Chris Deotte's ISIC 2019 images resized to 512x512, the external data of the 1st-place solution:
# `train.csv` (2020-style columns: image_name, patient_id (-1), sex, age_approx,
# anatom_site_general_challenge, diagnosis, benign_malignant, target, tfrecord, width, height) and
# `train/<image_name>.jpg`.
EXTERNAL_DATASET = "cdeotte/jpeg-isic2019-512x512"
COMPETITION_MEMBERS = ("*.csv", "jpeg/*")
EXTERNAL_MEMBERS = ("*",)


def extract(archive: Path, dest: Path, patterns: Sequence[str]) -> int:
    """Extract the members of `archive` that match any of `patterns`; return how many files."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()
                       and any(fnmatch.fnmatch(m.filename, p) for p in patterns)]
            for member in members:
                zf.extract(member, dest)  # zipfile drops absolute and '..' parts of names
    except zipfile.BadZipFile:
        raise UserError(f"{archive}: not a valid zip archive; delete it and download again") from None
    return len(members)


def fetch(args: list[str], archive: Path, patterns: Sequence[str],
          credentials: KaggleCredentials, force: bool = False, hint: str = "") -> Path:
    """Run one `kaggle ... download` into `archive.parent`, extract `patterns` there, drop the zip."""
    dest = archive.parent
    marker = dest / f".{archive.name}.complete"
    if marker.is_file() and not force:
        log.info("%s already downloaded and extracted (%s); skipping", archive.name, marker)
        return dest
    try:
        run_kaggle(args, credentials.secrets, echo=True)
    except UserError as err:
        raise UserError(f"{err}{hint}") from None
    if not archive.is_file():
        raise UserError(f"`kaggle {' '.join(args[:2])}` succeeded but {archive} is not there")
    n = extract(archive, dest, patterns)
    log.info("extracted %d file(s) from %s into %s", n, archive.name, dest)
    archive.unlink()
    marker.write_text(f"{n} files from {archive.name}\n")
    return dest


def download(cfg: Config, force: bool = False) -> Path:
    """Competition data and EXTERNAL_DATASET into the folder of `cfg.data.train_csv`; return it."""
    credentials = find_kaggle_credentials()
    data_dir = Path(cfg.data.train_csv).parent
    slug = cfg.submit.competition
    fetch(["competitions", "download", "-c", slug, "-p", str(data_dir)],
          data_dir / f"{slug}.zip", COMPETITION_MEMBERS, credentials, force,
          hint=f" (a 403 means the rules are not accepted yet: "
               f"https://www.kaggle.com/competitions/{slug}/rules)")
    external_dir = data_dir / "external"
    fetch(["datasets", "download", "-d", EXTERNAL_DATASET, "-p", str(external_dir)],
          external_dir / f"{EXTERNAL_DATASET.split('/')[1]}.zip", EXTERNAL_MEMBERS, credentials,
          force)
    duplicates = cfg.data.duplicates_csv
    if duplicates and not Path(duplicates).is_file():
        log.warning("%s is not part of the Kaggle data: get ISIC_2020_Training_Duplicates.csv from "
                    "the ISIC 2020 challenge site, or set data.duplicates_csv=null", duplicates)
    return data_dir
