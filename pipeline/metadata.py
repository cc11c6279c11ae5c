"""Patient metadata (sex, age, lesion site) as a small numeric vector beside the image.

The 1st-place SIIM-ISIC solution fed these to the head next to the image features. ISIC 2019's
finer torso sites map onto the 2020 vocabulary; a missing value gets its own indicator rather
than a guess.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SITES = ["head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital"]
SITE_ALIASES = {"anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso"}
N_FEATURES = 3 + 2 + len(SITES) + 1  # sex (male, female, missing), age (+missing), site (+missing)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(pd.NA, index=df.index, dtype="object")


def encode_metadata(df: pd.DataFrame) -> np.ndarray:
    """(N, N_FEATURES) float32 from a table with `sex`, `age_approx`, `anatom_site` (any missing)."""
    sex = _column(df, "sex").astype("string").str.strip().str.lower()
    age = pd.to_numeric(_column(df, "age_approx"), errors="coerce")
    site = _column(df, "anatom_site").astype("string").str.strip().str.lower().replace(SITE_ALIASES)
    parts = [
        (sex == "male").fillna(False), (sex == "female").fillna(False), ~sex.isin(["male", "female"]).fillna(False),
        (age.fillna(0) / 100), age.isna(),
        *[(site == s).fillna(False) for s in SITES], ~site.isin(SITES).fillna(False),
    ]
    return np.stack([np.asarray(p, dtype=np.float32) for p in parts], axis=1)
