"""Shared fixtures: offline environment, CPU, real data from ../shared when present."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"


@pytest.fixture
def real_data() -> Path:
    if not (REAL / "train.csv").is_file():
        pytest.skip(f"real data not found at {REAL}")
    return REAL
