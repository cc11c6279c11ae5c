"""The 9-class diagnosis target of the 1st-place solution: ISIC 2019's classes, P(MEL) as the score.

2020 rows carry free-text diagnoses; they map onto the 2019 classes (melanoma -> MEL, nevus -> NV,
the keratoses and lentigines -> BKL, everything else -> UNK). 2019 rows carry the class names
themselves (from the one-hot ground truth, or the merged re-encode's `diagnosis` column).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
MEL = CLASSES.index("MEL")
UNK = CLASSES.index("UNK")
COMPETITION_MAP = {
    "melanoma": "MEL",
    "nevus": "NV",
    "seborrheic keratosis": "BKL",
    "lentigo nos": "BKL",
    "lichenoid keratosis": "BKL",
    "solar lentigo": "BKL",
}


def class_of(diagnosis: object) -> str:
    """The 2019 class of one diagnosis string (a 2019 class name, or a 2020 free-text diagnosis)."""
    if diagnosis is None or pd.isna(diagnosis):
        return "UNK"
    text = str(diagnosis).strip()
    if text.upper() in CLASSES:
        return text.upper()
    return COMPETITION_MAP.get(text.lower(), "UNK")


def diagnosis_labels(diagnosis: pd.Series, target: pd.Series, where: str) -> np.ndarray:
    """Class index per row. The binary target decides melanoma: a positive is MEL whatever its
    diagnosis says, a negative labelled melanoma becomes UNK; both are counted in a warning, as
    are rows without a diagnosis."""
    classes = diagnosis.map(class_of).to_numpy(dtype=object)
    labels = np.array([CLASSES.index(c) for c in classes], np.int64)
    positive = np.asarray(target) == 1
    missing = int(diagnosis.isna().sum())
    if missing:
        log.warning("%s: %d row(s) without a diagnosis are class UNK (or MEL if positive)", where, missing)
    clash = int((diagnosis.notna().to_numpy() & (positive != (labels == MEL))).sum())
    if clash:
        log.warning("%s: %d row(s) whose diagnosis disagrees with the target; the target decides MEL",
                    where, clash)
    labels[positive] = MEL
    labels[~positive & (labels == MEL)] = UNK
    return labels
