"""Patient and image metadata as a numeric vector beside the image, the 1st-place solution's way.

Sex, age and lesion site, plus the number of images of the patient (log1p) and the JPEG's size
in bytes (log): the winners found both informative. ISIC 2019's finer torso sites map onto the
2020 vocabulary; a missing value gets its own indicator rather than a guess. Every feature is a
fixed function of its row (and the row's patient), so nothing is fitted on validation or test data.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.merge import COMPETITION_SOURCE

SITES = ["head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital"]
SITE_ALIASES = {"anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso"}
# sex (male, female, missing), age (+missing), site (+missing), images per patient, JPEG bytes
N_FEATURES = 3 + 2 + len(SITES) + 1 + 2


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(pd.NA, index=df.index, dtype="object")


def images_per_patient(df: pd.DataFrame) -> np.ndarray:
    """How many images of the table share each row's patient. Rows without a patient, and
    external rows (grouped by lesion, not patient), count 1, as in the winners' code."""
    if "patient_id" not in df.columns:
        return np.ones(len(df))
    patients = df["patient_id"].astype("string")
    counts = patients.map(patients.value_counts()).fillna(1).to_numpy(dtype=np.float64)
    if "source" in df.columns:
        counts = np.where((df["source"] == COMPETITION_SOURCE).to_numpy(), counts, 1.0)
    return counts


def jpeg_bytes(paths: pd.Series) -> np.ndarray:
    """File size of each image, naming the first file that cannot be read."""
    sizes = np.empty(len(paths))
    for i, path in enumerate(paths):
        try:
            sizes[i] = os.stat(path).st_size
        except OSError:
            raise UserError(f"{path}: cannot read the image file's size for the metadata") from None
    return sizes


def encode_metadata(df: pd.DataFrame) -> np.ndarray:
    """(N, N_FEATURES) float32 from a table with `sex`, `age_approx`, `anatom_site` (any missing),
    `patient_id` and `image_path`."""
    sex = _column(df, "sex").astype("string").str.strip().str.lower()
    age = pd.to_numeric(_column(df, "age_approx"), errors="coerce")
    site = _column(df, "anatom_site").astype("string").str.strip().str.lower().replace(SITE_ALIASES)
    sizes = jpeg_bytes(df["image_path"]) if "image_path" in df.columns else np.ones(len(df))
    parts = [
        (sex == "male").fillna(False), (sex == "female").fillna(False), ~sex.isin(["male", "female"]).fillna(False),
        (age.fillna(0) / 100), age.isna(),
        *[(site == s).fillna(False) for s in SITES], ~site.isin(SITES).fillna(False),
        np.log1p(images_per_patient(df)) / 5, np.log(np.maximum(sizes, 1)) / 15,
    ]
    return np.stack([np.asarray(p, dtype=np.float32) for p in parts], axis=1)
