"""`make report`'s HTML page: every section filled on a real (tiny) run, and, where Chromium is
installed, rendered in a headless browser with every figure decoded."""

import shutil
import subprocess

import cv2
import pytest

from pipeline.config import load_config
from pipeline.infer import run_infer
from pipeline.report import report
from pipeline.train import train_all
from tests.conftest import make_tiny_set

SECTIONS = ["Summary", "Folds", "ROC curves", "Training curves", "TTA on out-of-fold images",
            "Ensemble", "Predictions and calibration", "Run"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    folds, overrides = make_tiny_set(root)
    folds[["image_name"]].iloc[::3].to_csv(root / "test.csv", index=False)
    overrides += [f"data.test_csv={root}/test.csv", f"data.test_images={root}/jpeg",
                  f"infer.submissions_dir={root}/subs", f"ensemble.output={root}/subs/ensemble.csv",
                  "train.epochs=2", "train.log_every_n_steps=1", "infer.views=[identity,hflip,rot90]"]
    cfg = load_config(None, overrides)
    train_all(cfg)
    run_infer(cfg)
    report(cfg)
    return cfg.run_dir / "report.html"


def test_every_section_is_filled(page):
    text = page.read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in text, section
    assert 'class="missing"' not in text  # no section fell back to "not found"
    assert text.count("data:image/png;base64,") == 1 + 3 + 1 + 1 + 1  # ROC, 3 folds, TTA, heatmap, calibration


def test_a_missing_input_is_named_not_dropped(page):
    (page.parent / "tta_oof.json").unlink()
    from pipeline.report_html import tta_section
    cfg = load_config(page.parent / "config.yaml")
    assert "tta_oof.json not found" in tta_section(cfg)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(page, tmp_path):
    url = page.resolve().as_uri()
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-images="7/7"' in dom  # every figure decoded: no broken image
    shot = tmp_path / "report.png"
    subprocess.run(base + ["--window-size=1300,3000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] >= 3000
    assert image.std() > 20  # not a blank page
