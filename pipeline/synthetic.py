"""A synthetic data set in the exact Kaggle SIIM-ISIC layout, for the demo and end-to-end tests.

Patients, image counts, metadata and missing values are shaped on the real 2020 `train.csv`;
an ISIC 2019 shaped external set sits beside it. Each image has a continuous latent malignancy
score: it drives how the lesion looks (size, border, colours, asymmetry), and the label is drawn
from it and then partly swapped, so the latent score's AUC is the ceiling a model can reach.
A benign lesion's diagnosis follows the latent too (suspicious classes sit higher), so the
diagnosis is a training target that says more than the binary label.
Patients carry their own skin tone, lesion style and share of the latent, so a patient split
across folds inflates CV as it does on the real data.

Every draw comes from a numpy Generator seeded by (seed, stream, split, index): the same seed gives
the same CSV and JPEG bytes whatever `n_jobs` is.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import roc_auc_score

from pipeline.atomic import atomic_path, atomic_write_csv
from pipeline.config import SyntheticConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)

TRAIN_COLUMNS = [
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
    "diagnosis", "benign_malignant", "target",
]
TEST_COLUMNS = TRAIN_COLUMNS[:5]
EXTERNAL_DIAGNOSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
EXTERNAL_META_COLUMNS = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]

# Frequencies of the real 2020 train.csv and ISIC 2019 metadata / ground truth.
SITES = {
    "torso": 16845, "lower extremity": 8417, "upper extremity": 4983, "head/neck": 1855,
    "palms/soles": 375, "oral/genital": 124,
}
EXTERNAL_SITES = {
    "anterior torso": 6915, "lower extremity": 4990, "head/neck": 4587, "upper extremity": 2910,
    "posterior torso": 2787, "palms/soles": 398, "oral/genital": 59, "lateral torso": 54,
}
BENIGN_DIAGNOSES = {
    "unknown": 27124, "nevus": 5193, "seborrheic keratosis": 135, "lentigo NOS": 44,
    "lichenoid keratosis": 37, "solar lentigo": 7, "atypical melanocytic proliferation": 1,
    "cafe-au-lait macule": 1,
}
EXTERNAL_BENIGN = {
    "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628,
}
# How far each benign class's latent sits above the average (in latent SDs); see
# `draw_benign_diagnoses`. Excised look-alikes (keratoses, lentigines, atypical proliferations;
# BCC, AK, SCC) sit high; moles, angiomas and dermatofibromas low.
BENIGN_SHIFTS = {
    "unknown": 0.0, "nevus": -0.5, "seborrheic keratosis": 0.8, "lentigo NOS": 0.8,
    "lichenoid keratosis": 0.6, "solar lentigo": 0.5, "atypical melanocytic proliferation": 1.5,
    "cafe-au-lait macule": -0.5,
}
EXTERNAL_SHIFTS = {
    "NV": -0.4, "BCC": 0.8, "AK": 0.7, "BKL": 0.4, "DF": -0.6, "VASC": -0.6, "SCC": 1.0,
}
EXTERNAL_MEL_RATE = 0.18  # ISIC 2019 ground truth: 4,522 MEL of 25,331

# Images per patient: real median 12, quartiles 5 and 22, range 2-115 (lognormal, clipped).
IMAGES_MEDIAN, IMAGES_SIGMA, IMAGES_MIN, IMAGES_MAX = 12, 0.95, 2, 115
LESION_IMAGES_P, LESION_IMAGES_MAX = 0.5, 6  # ISIC 2019: a lesion has 1.96 images on average
AGE_MEAN, AGE_SD = 49.0, 14.0

# Missing shares. The real ones (0.2% sex/age, 1.6% site) would leave a demo set with none at all,
# so at least one value goes missing wherever a column can be missing.
MISSING_SEX, MISSING_AGE, MISSING_SITE = 0.01, 0.01, 0.016  # per patient, patient, image
EXTERNAL_MISSING = {"sex": 0.015, "age": 0.017, "site": 0.10}
NO_LESION_ID = 0.3  # share of single-image external lesions written without a lesion_id

# Latent score = patient share + age share + image share, scaled to about N(0, 1).
PATIENT_SD, AGE_WEIGHT = 0.6, 0.4
LATENT_SD = math.sqrt(PATIENT_SD**2 + (AGE_WEIGHT * AGE_SD / 15) ** 2 + 1)
SHARPNESS = 2.5  # slope of the label's logistic on the latent: ceiling AUC ~0.9 before label noise

JPEG_QUALITY = 90
CHUNK = 32  # images per joblib task: enough to hide the task overhead
PROGRESS_EVERY = 2000  # log rendering progress when a split has more images than this

# Stream ids: each kind of draw gets its own Generator, so changing one size does not reshuffle
# the others.
TABLE, IDS, LESION, VIEW, DIAGNOSIS = 0, 1, 2, 3, 4
TRAIN, TEST, EXTERNAL = 0, 1, 2

BGR = tuple[float, float, float]
SKIN_TONES = np.array(
    [[196, 206, 238], [160, 180, 222], [118, 146, 196], [72, 98, 142]], np.float32
)
PIGMENTS = np.array([[88, 118, 168], [40, 58, 98], [66, 76, 140]], np.float32)
# Patch colours: blue-grey, black, red (malignant signs), dark brown, tan (benign).
PATCH_COLOURS = np.array(
    [[132, 112, 100], [26, 24, 30], [58, 52, 150], [32, 52, 86], [88, 122, 164]], np.float32
)
PATCH_BENIGN = np.array([0.0, 0.05, 0.05, 0.5, 0.4])
PATCH_MALIGNANT = np.array([0.35, 0.3, 0.25, 0.1, 0.0])


@dataclass
class SyntheticSummary:
    """What `generate_synthetic` wrote, and the AUC the latent score reaches on it."""

    out_dir: str
    n_train: int
    n_test: int
    n_external: int
    n_train_patients: int
    n_test_patients: int
    n_external_lesions: int
    train_positive_rate: float
    test_positive_rate: float
    external_mel_rate: float
    ceiling_auc_train: float
    ceiling_auc_test: float
    seconds: float
    paths: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LesionSpec:
    """Everything one image's pixels depend on; picklable for the joblib workers."""

    path: str
    malignancy: float  # in (0, 1), monotone in the latent score
    skin: BGR
    pigment: BGR
    hair: float  # expected number of hairs
    scale: float  # the patient's lesion size factor
    lesion_seed: tuple[int, ...]  # shape and colours: shared by all views of one lesion
    view_seed: tuple[int, ...]  # pose, lighting, hairs, vignetting: one image


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choice(rng: np.random.Generator, freq: dict[str, int], n: int) -> np.ndarray:
    """`n` draws of the keys of `freq`, in proportion to its values."""
    p = np.array(list(freq.values()), float)
    return np.array(list(freq), dtype=object)[rng.choice(len(p), size=n, p=p / p.sum())]


def _pick(rng: np.random.Generator, n: int, share: float) -> np.ndarray:
    """Boolean mask of round(share * n) rows, at least one when share > 0 and n > 1."""
    k = min(n, max(int(share > 0 and n > 1), round(share * n)))
    mask = np.zeros(n, bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def _unique_ints(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    return low + rng.choice(high - low, size=n, replace=False)


def images_per_patient(rng: np.random.Generator, n: int) -> np.ndarray:
    """Image counts with the real set's heavy right tail (median 12, clipped to [2, 115])."""
    counts = np.round(IMAGES_MEDIAN * np.exp(IMAGES_SIGMA * rng.standard_normal(n)))
    return np.clip(counts, IMAGES_MIN, IMAGES_MAX).astype(int)


def _ages(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.clip(np.round(rng.normal(AGE_MEAN, AGE_SD, n) / 5) * 5, 0, 90)


def _styles(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Per patient (or external lesion) look: skin tone, pigment, hair, lesion size."""
    tone = 3 * rng.beta(1.3, 3.0, n)  # mostly fair skin, as in ISIC
    lo = np.floor(tone).astype(int).clip(0, 2)
    skin = SKIN_TONES[lo] + (tone - lo)[:, None] * (SKIN_TONES[lo + 1] - SKIN_TONES[lo])
    pigment = rng.dirichlet(np.ones(len(PIGMENTS)), n) @ PIGMENTS
    return pd.DataFrame({
        "skin": [tuple(map(float, s)) for s in skin],
        "pigment": [tuple(map(float, p)) for p in pigment],
        "hair": rng.choice([0.0, 1.0, 3.0, 8.0], size=n, p=[0.4, 0.3, 0.2, 0.1]),
        "scale": rng.uniform(0.85, 1.15, n),
    })


def latent_score(effect: np.ndarray, age: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Patient (or lesion) share + age share + image share, scaled to about unit variance."""
    return (effect + AGE_WEIGHT * (age - 50) / 15 + noise) / LATENT_SD


def label_intercept(positive_rate: float) -> float:
    """Intercept b with E[sigmoid(SHARPNESS * z + b)] = positive_rate for z ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if weights @ _sigmoid(SHARPNESS * nodes + mid) < positive_rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def draw_targets(
    rng: np.random.Generator, latent: np.ndarray, positive_rate: float, label_noise: float
) -> np.ndarray:
    """Labels drawn from logistic(latent), then `label_noise` of the positives swapped with
    as many random negatives: noise that lowers the ceiling but keeps the positive rate."""
    p = _sigmoid(SHARPNESS * latent + label_intercept(positive_rate))
    target = (rng.random(len(latent)) < p).astype(int)
    pos, neg = np.flatnonzero(target == 1), np.flatnonzero(target == 0)
    k = min(round(label_noise * len(pos)), len(neg))
    if k:
        target[rng.choice(pos, k, replace=False)] = 0
        target[rng.choice(neg, k, replace=False)] = 1
    return target


def draw_benign_diagnoses(
    rng: np.random.Generator, latent: np.ndarray, freq: dict[str, int], shifts: dict[str, float]
) -> np.ndarray:
    """One benign diagnosis per lesion, drawn from its posterior given the latent score.

    As if class c had the prior `freq[c]` and latent ~ N(shifts[c], 1): P(c | z) is proportional to
    freq[c] * exp(shifts[c] * z - shifts[c]**2 / 2). The classes keep about their real frequencies,
    a high latent makes the suspicious ones likelier, and the draw stays noisy (the classes overlap),
    so a model can learn from the class what the 0/1 label alone does not say.
    """
    names = np.array(list(freq), dtype=object)
    shift = np.array([shifts[c] for c in freq])
    logits = np.log(np.array(list(freq.values()), float)) + np.outer(latent, shift) - shift**2 / 2
    cdf = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)
    u = rng.random(len(latent)) * cdf[:, -1]
    return names[(cdf < u[:, None]).sum(axis=1)]  # inverse CDF, one row at a time


def _patients_table(rng: np.random.Generator, n: int, with_missing: bool) -> pd.DataFrame:
    """One row per patient: image count, sex, age, latent share, style."""
    patients = _styles(rng, n)
    patients["n_images"] = images_per_patient(rng, n)
    patients["sex"] = np.where(rng.random(n) < 0.52, "male", "female").astype(object)
    patients["age"] = _ages(rng, n)
    patients["second_age"] = rng.choice([0.0, 0.3, 0.6], size=n)  # follow-up over years
    patients["effect"] = rng.normal(0, PATIENT_SD, n)
    patients["missing_sex"] = _pick(rng, n, MISSING_SEX * with_missing)
    patients["missing_age"] = _pick(rng, n, MISSING_AGE * with_missing)
    return patients


def _competition_split(
    cfg: SyntheticConfig, split: int, n_patients: int, with_missing: bool
) -> pd.DataFrame:
    """Image rows of one split (train or test), with latent, target and style; no names yet."""
    rng = _rng(cfg.seed, TABLE, split)
    patients = _patients_table(rng, n_patients, with_missing)
    df = patients.loc[np.repeat(patients.index, patients["n_images"])].reset_index(names="patient")
    n = len(df)
    age = df["age"] + 5 * (rng.random(n) < df["second_age"])
    df["age"] = np.minimum(age, 90)
    noise = rng.standard_normal(n)
    df["latent"] = latent_score(df["effect"].to_numpy(), df["age"].to_numpy(), noise)
    df["target"] = draw_targets(rng, df["latent"].to_numpy(), cfg.positive_rate, cfg.label_noise)
    df["site"] = _choice(rng, SITES, n)
    df.loc[_pick(rng, n, MISSING_SITE), "site"] = None
    df.loc[df["missing_sex"], "sex"] = None
    df["age_approx"] = df["age"].where(~df["missing_age"])
    benign = draw_benign_diagnoses(
        _rng(cfg.seed, DIAGNOSIS, split), df["latent"].to_numpy(), BENIGN_DIAGNOSES, BENIGN_SHIFTS
    )
    df["diagnosis"] = np.where(df["target"] == 1, "melanoma", benign)
    df["benign_malignant"] = np.where(df["target"] == 1, "malignant", "benign")
    df["split"] = split
    return df.rename_axis("index").reset_index()


def build_competition_tables(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test image tables (hidden columns included), with disjoint patients and names."""
    train = _competition_split(cfg, TRAIN, cfg.n_patients, with_missing=True)
    test = _competition_split(cfg, TEST, cfg.n_test_patients, with_missing=False)
    ids = _rng(cfg.seed, IDS)
    names = _unique_ints(ids, len(train) + len(test), 0, 9_000_000)
    patients = _unique_ints(ids, cfg.n_patients + cfg.n_test_patients, 0, 10_000_000)
    for df, offset, patient_offset in ((train, 0, 0), (test, len(train), cfg.n_patients)):
        df["image_name"] = [f"ISIC_{i:07d}" for i in names[offset:offset + len(df)]]
        df["patient_id"] = [f"IP_{patients[patient_offset + p]:07d}" for p in df["patient"]]
    return (train.sort_values("image_name", ignore_index=True),
            test.sort_values("image_name", ignore_index=True))


def _lesions_table(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """One row per external lesion: images, metadata, latent, label, style."""
    lesions = _styles(rng, n)
    lesions["n_images"] = np.minimum(rng.geometric(LESION_IMAGES_P, n), LESION_IMAGES_MAX)
    lesions["sex"] = np.where(rng.random(n) < 0.52, "male", "female").astype(object)
    age = _ages(rng, n)
    lesions["latent"] = latent_score(
        rng.normal(0, PATIENT_SD, n), age, rng.standard_normal(n)
    )
    lesions["age_approx"] = pd.array(age.astype(int), dtype="Int64")
    lesions["site"] = _choice(rng, EXTERNAL_SITES, n)
    lesions.loc[_pick(rng, n, EXTERNAL_MISSING["sex"]), "sex"] = None
    lesions.loc[_pick(rng, n, EXTERNAL_MISSING["age"]), "age_approx"] = pd.NA
    lesions.loc[_pick(rng, n, EXTERNAL_MISSING["site"]), "site"] = None
    return lesions


def build_external_table(cfg: SyntheticConfig) -> pd.DataFrame:
    """ISIC 2019 shaped image rows: one-hot diagnosis, lesion_id grouping several images."""
    rng = _rng(cfg.seed, TABLE, EXTERNAL)
    n = cfg.n_external_lesions
    lesions = _lesions_table(rng, n)
    mel = draw_targets(rng, lesions["latent"].to_numpy(), EXTERNAL_MEL_RATE, cfg.label_noise)
    rng.random(n)  # the place of the old latent-blind benign draw: keeps the lesion ids below
    benign = draw_benign_diagnoses(
        _rng(cfg.seed, DIAGNOSIS, EXTERNAL), lesions["latent"].to_numpy(), EXTERNAL_BENIGN,
        EXTERNAL_SHIFTS,
    )
    lesions["diagnosis"] = np.where(mel == 1, "MEL", benign)
    lesion_ids = [f"HAM_{i:07d}" for i in _unique_ints(rng, n, 0, 10_000_000)]
    unnamed = (lesions["n_images"] == 1) & (rng.random(n) < NO_LESION_ID)
    lesions["lesion_id"] = np.where(unnamed, None, lesion_ids)
    df = lesions.loc[np.repeat(lesions.index, lesions["n_images"])]
    df = df.reset_index(names="lesion").rename_axis("index").reset_index()
    names = _unique_ints(_rng(cfg.seed, IDS, EXTERNAL), len(df), 9_000_000, 10_000_000)
    df["image"] = [f"ISIC_{i:07d}" for i in names]
    df["target"] = (df["diagnosis"] == "MEL").astype(int)
    df["split"] = EXTERNAL
    return df.sort_values("image", ignore_index=True)


def _specs(
    df: pd.DataFrame, names: pd.Series, folder: Path, seed: int, group: str
) -> list[LesionSpec]:
    """Render specs of a table's rows; `group` names the column whose rows share one lesion."""
    malignancy = _sigmoid(1.7 * df["latent"].to_numpy())  # ~ normal CDF: rate-independent look
    rows = zip(names, malignancy, df["skin"], df["pigment"], df["hair"], df["scale"],
               df["split"], df[group], df["index"], strict=True)
    return [
        LesionSpec(
            str(folder / f"{name}.jpg"), float(m), skin, pigment, float(hair), float(scale),
            (seed, LESION, int(split), int(g)), (seed, VIEW, int(split), int(i)),
        )
        for name, m, skin, pigment, hair, scale, split, g, i in rows
    ]


def _contour(rng: np.random.Generator, s: float, radius: float, size: int) -> np.ndarray:
    """Lesion outline around the centre: asymmetry (low harmonics) and a ragged border (higher
    harmonics, random amplitudes falling as 1/k so it looks irregular, not cogwheel) both grow
    with malignancy `s`."""
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    k = np.arange(1, 25)
    amp = np.where(k <= 3, (0.03 + 0.22 * s) * rng.uniform(0.3, 1.0, k.size) / k**0.5,
                   (0.02 + 0.22 * s) * rng.standard_normal(k.size) / k)
    phase = rng.uniform(0, 2 * np.pi, (k.size, 1))
    rad = 1 + (amp[:, None] * np.cos(k[:, None] * theta + phase)).sum(0)
    ratio = rng.uniform(0.7, 1.0)
    unit = np.stack([np.cos(theta), ratio * np.sin(theta)], 1)
    xy = unit * (radius * np.maximum(rad, 0.3))[:, None]
    return xy + size / 2


def _soft_fill(size: int, draw, sigma: float) -> np.ndarray:
    """A float mask in [0, 1] from a cv2 drawing call on an 8-bit canvas, edges blurred."""
    canvas = np.zeros((size, size), np.uint8)
    draw(canvas)
    mask = canvas.astype(np.float32) * np.float32(1 / 255)
    return cv2.GaussianBlur(mask, (0, 0), max(sigma, 0.3))


@lru_cache(maxsize=8)
def _radius_grid(size: int) -> np.ndarray:
    """Distance of each pixel centre from the image centre, in pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5 - size / 2
    return np.hypot(xx, yy)


def _patch(
    rng: np.random.Generator, radius: float, size: int
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """One soft ellipse inside the lesion, drawn only in its bounding box (speed)."""
    rho, phi = radius * rng.uniform(0, 0.7), rng.uniform(0, 2 * np.pi)
    axes = radius * rng.uniform(0.15, 0.45, 2)
    angle = rng.uniform(0, 180)
    reach = int(np.ceil(axes.max() * 1.5)) + 2
    cx, cy = size / 2 + rho * np.cos(phi), size / 2 + rho * np.sin(phi)
    x0, y0 = max(int(cx) - reach, 0), max(int(cy) - reach, 0)
    x1, y1 = min(int(cx) + reach, size), min(int(cy) + reach, size)
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    box = ((cx - x0, cy - y0), (2 * axes[0], 2 * axes[1]), angle)
    cv2.ellipse(canvas, box, 255, -1, cv2.LINE_AA)
    mask = cv2.GaussianBlur(canvas.astype(np.float32) * np.float32(1 / 255), (0, 0), axes.min() / 3)
    return mask, (slice(y0, y1), slice(x0, x1))


def _patches(rng: np.random.Generator, colour: np.ndarray, s: float, radius: float) -> None:
    """Blend colour patches into the lesion, in place: blue-grey, black and red when malignant."""
    weights = (1 - s) * PATCH_BENIGN + s * PATCH_MALIGNANT
    for _ in range(rng.poisson(0.4 + 4.0 * s)):
        mask, box = _patch(rng, radius, colour.shape[0])
        alpha = np.float32(rng.uniform(0.5, 0.9)) * mask[..., None]
        tint = PATCH_COLOURS[rng.choice(len(weights), p=weights / weights.sum())]
        colour[box] = colour[box] * (1 - alpha) + alpha * tint


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], shape (size, size, 1): blotches of skin and pigment."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]


def canonical_lesion(spec: LesionSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The lesion centred and unrotated: BGR colour layer and its soft mask. Depends only on
    `lesion_seed`, so every view of one external lesion shows the same lesion."""
    rng = np.random.default_rng(spec.lesion_seed)
    s = spec.malignancy
    share = np.clip(0.12 + 0.10 * s + 0.015 * rng.standard_normal(), 0.07, 0.3)
    radius = size * spec.scale * float(share)
    pts = np.round(_contour(rng, s, radius, size) * 16).astype(np.int32)
    edge = size * (0.004 + 0.02 * (1 - s) * rng.uniform(0.5, 1.0))  # benign borders fade out
    mask = _soft_fill(size, lambda c: cv2.fillPoly(c, [pts], 255, cv2.LINE_AA, shift=4), edge)
    centre = 1 - 0.3 * np.clip(1 - _radius_grid(size) / np.float32(radius), 0, 1)  # darker middle
    # Pigment grows patchier with malignancy, at a coarse and a fine scale.
    texture = (1 + (0.06 + 0.12 * s) * _smooth_noise(rng, size, 7)
               + (0.04 + 0.10 * s) * _smooth_noise(rng, size, max(8, size // 6)))
    darkness = np.float32((1 - 0.25 * s) * rng.uniform(0.8, 1.1))
    colour = np.asarray(spec.pigment, np.float32) * darkness * centre[..., None] * texture
    _patches(rng, colour, s, radius)
    return colour, mask


def _skin(rng: np.random.Generator, size: int, skin: BGR) -> np.ndarray:
    base = np.asarray(skin, np.float32) * np.float32(rng.uniform(0.92, 1.06))
    blotch = 1 + 0.06 * _smooth_noise(rng, size, 6)
    grain = 2.5 * rng.standard_normal((size, size, 1), dtype=np.float32)
    return base * blotch + grain


def _hairs(rng: np.random.Generator, img: np.ndarray, expected: float) -> None:
    """Dark curved hairs across the image, in place; all drawn on one canvas (speed)."""
    n = rng.poisson(expected)
    if not n:
        return
    size = img.shape[0]
    t = np.linspace(0, 1, 16)[:, None]
    curves = []
    for p0, p1, p2 in rng.uniform(-0.1, 1.1, (n, 3, 2)) * size:
        curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
        curves.append(np.round(curve * 16).astype(np.int32))
    width = max(1, size // 160)
    hair = _soft_fill(size, lambda c: cv2.polylines(
        c, curves, False, 255, width, cv2.LINE_AA, shift=4), 0.3)[..., None] * np.float32(0.85)
    img *= 1 - hair
    img += hair * np.float32(rng.uniform(15, 45))


def _vignette(rng: np.random.Generator, img: np.ndarray) -> None:
    """Darker corners and, on some images, the black ring of a dermatoscope, in place."""
    size = img.shape[0]
    r = _radius_grid(size) / np.float32(size)
    img *= (1 - np.float32(rng.uniform(0.1, 0.6)) * r**2)[..., None]
    if rng.random() < 0.25:
        ring = int(size * rng.uniform(0.53, 0.65))
        inside = _soft_fill(size, lambda c: cv2.circle(
            c, (size // 2, size // 2), ring, 255, -1, cv2.LINE_AA), size * 0.01)[..., None]
        img *= inside
        img += (1 - inside) * np.float32(12)


def render_lesion(spec: LesionSpec, size: int) -> np.ndarray:
    """One BGR uint8 image: skin, the lesion posed by `view_seed`, hairs, vignetting."""
    colour, mask = canonical_lesion(spec, size)
    rng = np.random.default_rng(spec.view_seed)
    pose = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(0, 360), rng.uniform(0.9, 1.1))
    pose[:, 2] += rng.uniform(-0.08, 0.08, 2) * size
    colour = cv2.warpAffine(colour, pose, (size, size), borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(mask, pose, (size, size), borderValue=0)[..., None]
    img = _skin(rng, size, spec.skin)
    img = img * (1 - mask) + colour * mask
    _hairs(rng, img, spec.hair)
    _vignette(rng, img)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_jpeg(path: str | Path, image: np.ndarray, quality: int = JPEG_QUALITY) -> None:
    """Encode and write atomically: a killed run never leaves a truncated JPEG under its name."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cv2 could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def _render_chunk(specs: list[LesionSpec], size: int) -> int:
    # cv2's own threads only contend with the joblib workers on images this small.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for spec in specs:
            write_jpeg(spec.path, render_lesion(spec, size))
    finally:
        cv2.setNumThreads(threads)
    return len(specs)


def render_all(specs: list[LesionSpec], size: int, n_jobs: int) -> None:
    """Render and write every image; workers only change speed, never bytes."""
    chunks = [specs[i:i + CHUNK] for i in range(0, len(specs), CHUNK)]
    if n_jobs == 1 or len(chunks) <= 1:
        done = (_render_chunk(c, size) for c in chunks)
    else:
        done = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(_render_chunk)(c, size) for c in chunks
        )
    total, step = 0, max(PROGRESS_EVERY, len(specs) // 10)
    for n in done:
        total += n
        if len(specs) > PROGRESS_EVERY and total // step != (total - n) // step:
            log.info("rendered %d / %d images", total, len(specs))


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop JPEGs of an earlier, larger run, so image folders match the new tables."""
    stale = [p for p in folder.glob("*.jpg") if p.stem not in keep]
    for path in stale:
        path.unlink()
    if stale:
        log.info("%s: removed %d stale image(s)", folder, len(stale))


def ceiling_auc(target: np.ndarray, latent: np.ndarray) -> float:
    """AUC of the latent score on the labels: the best any model can do on this split."""
    if len(np.unique(target)) < 2:
        log.warning("only one class in a split: ceiling AUC undefined")
        return float("nan")
    return float(roc_auc_score(target, latent))


def _external_tables(ext: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ISIC 2019 ground truth (one-hot floats) and metadata tables."""
    onehot = {d: (ext["diagnosis"] == d).astype(float) for d in EXTERNAL_DIAGNOSES}
    gt = pd.DataFrame({"image": ext["image"], **onehot})
    meta = ext.rename(columns={"site": "anatom_site_general"})[EXTERNAL_META_COLUMNS]
    return gt, meta


def _csv_paths(out: Path) -> dict[str, Path]:
    return {
        "train_csv": out / "train.csv",
        "test_csv": out / "test.csv",
        "sample_submission": out / "sample_submission.csv",
        "external_ground_truth": out / "external" / "ISIC_2019_Training_GroundTruth.csv",
        "external_metadata": out / "external" / "ISIC_2019_Training_Metadata.csv",
        "train_latent": out / "_truth" / "train_latent.csv",
        "test_labels": out / "_truth" / "test_labels.csv",
    }


def _competition_csv(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    out = df.rename(columns={"site": "anatom_site_general_challenge"})
    return out[columns]


def _write_tables(
    paths: dict[str, Path], train: pd.DataFrame, test: pd.DataFrame, ext: pd.DataFrame
) -> None:
    """Hidden truth first, the Kaggle CSVs last: a table exists only once its images do."""
    truth = ["image_name", "target", "latent"]
    atomic_write_csv(train[truth], paths["train_latent"])
    atomic_write_csv(test[truth], paths["test_labels"])
    gt, meta = _external_tables(ext)
    atomic_write_csv(gt, paths["external_ground_truth"])
    atomic_write_csv(meta, paths["external_metadata"])
    atomic_write_csv(test[["image_name"]].assign(target=0), paths["sample_submission"])
    atomic_write_csv(_competition_csv(test, TEST_COLUMNS), paths["test_csv"])
    atomic_write_csv(_competition_csv(train, TRAIN_COLUMNS), paths["train_csv"])


def _check_config(cfg: SyntheticConfig) -> None:
    if not 0 < cfg.positive_rate < 1:
        raise UserError(f"synthetic.positive_rate must be in (0, 1), got {cfg.positive_rate}")
    if not 0 <= cfg.label_noise < 0.5:
        raise UserError(f"synthetic.label_noise must be in [0, 0.5), got {cfg.label_noise}")
    if cfg.n_patients < 1 or cfg.n_test_patients < 1 or cfg.n_external_lesions < 0:
        raise UserError("synthetic.n_patients and n_test_patients must be >= 1, "
                        "n_external_lesions >= 0")
    if cfg.n_jobs == 0:
        raise UserError("synthetic.n_jobs must be a positive count or negative (joblib style)")
    if cfg.image_size < 32:
        raise UserError(f"synthetic.image_size must be at least 32, got {cfg.image_size}")


def _summary(
    cfg: SyntheticConfig, paths: dict[str, Path], train: pd.DataFrame, test: pd.DataFrame,
    ext: pd.DataFrame, seconds: float,
) -> SyntheticSummary:
    return SyntheticSummary(
        out_dir=str(cfg.out_dir), n_train=len(train), n_test=len(test), n_external=len(ext),
        n_train_patients=train["patient_id"].nunique(),
        n_test_patients=test["patient_id"].nunique(),
        n_external_lesions=cfg.n_external_lesions,
        train_positive_rate=float(train["target"].mean()),
        test_positive_rate=float(test["target"].mean()),
        external_mel_rate=float(ext["target"].mean()) if len(ext) else float("nan"),
        ceiling_auc_train=ceiling_auc(train["target"].to_numpy(), train["latent"].to_numpy()),
        ceiling_auc_test=ceiling_auc(test["target"].to_numpy(), test["latent"].to_numpy()),
        seconds=round(seconds, 2), paths={k: str(v) for k, v in paths.items()},
    )


def generate_synthetic(cfg: SyntheticConfig) -> SyntheticSummary:
    """Write the synthetic set under `cfg.out_dir` in Kaggle layout and return its summary.

    Images are always rendered anew; the CSVs go first out of the way and are written last, so
    a killed run leaves no table that disagrees with the images.
    """
    _check_config(cfg)
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    paths = _csv_paths(out)
    for path in paths.values():
        path.unlink(missing_ok=True)
    train, test = build_competition_tables(cfg)
    ext = build_external_table(cfg)
    folders = {"train": out / "jpeg" / "train", "test": out / "jpeg" / "test",
               "external": out / "external" / "jpeg"}
    specs = (_specs(train, train["image_name"], folders["train"], cfg.seed, "index")
             + _specs(test, test["image_name"], folders["test"], cfg.seed, "index")
             + _specs(ext, ext["image"], folders["external"], cfg.seed, "lesion"))
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    log.info("rendering %d images of %dpx with %d job(s)", len(specs), cfg.image_size, cfg.n_jobs)
    render_all(specs, cfg.image_size, cfg.n_jobs)
    for key, names in (("train", train["image_name"]), ("test", test["image_name"]),
                       ("external", ext["image"])):
        _remove_stale(folders[key], set(names))
    _write_tables(paths, train, test, ext)
    summary = _summary(cfg, paths, train, test, ext, time.perf_counter() - start)
    summary.paths.update({f"{k}_images": str(v) for k, v in folders.items()})
    log.info("synthetic set in %s: %d train / %d test / %d external images, positive rate "
             "train=%.3f test=%.3f; ceiling AUC (latent score) train=%.4f test=%.4f",
             out, summary.n_train, summary.n_test, summary.n_external,
             summary.train_positive_rate, summary.test_positive_rate,
             summary.ceiling_auc_train, summary.ceiling_auc_test)
    return summary
