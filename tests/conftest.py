"""Shared fixtures: offline environment, CPU, real data from ../shared when present."""

import os
from pathlib import Path

import pytest

from pipeline.cli import quiet_third_party

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
quiet_third_party()

pytest_plugins = ["tests.fake_kaggle"]  # the fake Kaggle server fixtures

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"


@pytest.fixture
def real_data() -> Path:
    if not (REAL / "train.csv").is_file():
        pytest.skip(f"real data not found at {REAL}")
    return REAL


def make_tiny_set(root: Path, n_patients: int = 12, per_patient: int = 4, size: int = 40,
                  n_folds: int = 3, seed: int = 0):
    """A small learnable set: positives carry a bright disc. Returns (folds table, config overrides)."""
    import cv2
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    images = root / "jpeg"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        for i in range(per_patient):
            name = f"ISIC_{p:03d}{i:02d}"
            target = int(i == 0 and p % 2 == 0)
            img = np.full((size, size, 3), rng.integers(120, 200, 3), np.uint8)
            radius = size // 3 if target else size // 8
            cv2.circle(img, (size // 2, size // 2), radius, (40, 30, 20), -1)
            cv2.imwrite(str(images / f"{name}.jpg"), img)
            rows.append((name, f"IP_{p}", target, "isic2020", str(images / f"{name}.jpg"),
                         p % n_folds, ("male", "female")[p % 2], 30 + 5 * (p % 8),
                         ("torso", "head/neck", None)[i % 3]))
    folds = pd.DataFrame(rows, columns=["image_name", "patient_id", "target", "source",
                                        "image_path", "fold", "sex", "age_approx", "anatom_site"])
    path = root / "folds.csv"
    folds.to_csv(path, index=False)
    overrides = [
        f"folds.output={path}", f"runs_dir={root / 'runs'}", "experiment=tiny",
        "model.backbone=test_efficientnet", "model.pretrained=false",
        f"data.image_size={size}", f"data.crop_size={size - 8}", "data.batch_size=8",
        "data.num_workers=0", "train.epochs=2", "train.lr=0.01", "train.bootstrap=20",
        "infer.batch_size=16", "train.progress_bar=false",
    ]
    return folds, overrides


def tiny_test_set(root: Path, folds) -> list[str]:
    """Every third image of the tiny set as a test set, with its sample submission; returns the
    overrides that read them and send submissions to root/subs."""
    test = folds[["image_name"]].iloc[::3]
    test.to_csv(root / "test.csv", index=False)
    test.assign(target=0).to_csv(root / "sample.csv", index=False)
    return [f"data.test_csv={root}/test.csv", f"data.test_images={root}/jpeg",
            f"data.sample_submission={root}/sample.csv", f"infer.submissions_dir={root}/subs",
            f"ensemble.output={root}/subs/ensemble.csv"]
