import subprocess
import sys

import pytest

from pipeline.cli import UserError
from pipeline.model import warmup_fraction
from tests.conftest import REPO

FORK_AFTER_CV2 = """
import cv2, numpy as np
from pipeline.data import ImageDataset, make_loader
img = np.zeros((1500, 1500, 3), np.uint8)
for _ in range(3):
    cv2.resize(cv2.GaussianBlur(img, (31, 31), 0), (300, 300))  # the parent uses OpenCV first
cv2.imwrite({path!r}, img[:64, :64])
ds = ImageDataset([{path!r}] * 8)
print(sum(len(b["index"]) for b in make_loader(ds, 4, 2, False)))
"""


def test_loader_workers_fork_safely_after_the_parent_used_opencv(tmp_path):
    """A pool resized inside forked workers deadlocked: seen on an H200 box, reproduced here."""
    code = FORK_AFTER_CV2.format(path=str(tmp_path / "x.jpg"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "8"


def test_warmup_fraction_never_one_step():
    assert warmup_fraction(0.3, 100) == 0.3
    assert warmup_fraction(0.1, 10) == pytest.approx(0.2)  # torch would divide by zero at 0.1
    assert warmup_fraction(0.99, 10) == pytest.approx(0.8)
    with pytest.raises(UserError, match="at least 4 optimizer steps"):
        warmup_fraction(0.1, 3)
