"""`make bench` end to end at toy sizes on the CPU: both data paths measured, every figure finite,
the JSON written. Speeds are not asserted (they belong to the benchmark, not to tests); this
keeps the GPU session's script from failing on a Python error after minutes of device time."""

import json
import math

import pytest

from pipeline.bench import run_bench
from pipeline.config import load_config
from pipeline.errors import UserError
from tests.conftest import REPO

TOY = ["bench.n_images=64", "bench.batch_size=8", "bench.train_steps=4", "bench.warmup_steps=1",
       "bench.repeats=1", "bench.num_workers=0", "bench.jpeg_size=96", "bench.crop_size=64",
       "bench.backbone=test_efficientnet", "infer.batch_size=16", "bench.ensemble_files=3",
       "bench.ensemble_rows=100", "bench.folds_rows=300", "train.progress_bar=false"]


def test_bench_measures_both_data_paths_and_writes_its_json(tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml", TOY + [f"bench.work_dir={tmp_path}", "bench.profile=true"])
    result = run_bench(cfg)
    assert set(result["paths"]) == {"cpu", "gpu"}
    for figures in result["paths"].values():
        for key in ("train_lightning_img_s", "train_plain_img_s", "end_to_end_vs_model_bound",
                    "tta_1view", "tta_8views", "tta_8views_vs_forward_over_8"):
            assert math.isfinite(figures[key]) and figures[key] > 0, key
        assert 0 <= figures["train_plain_loader_wait_share"] <= 1
        assert figures["data_path"]["img_s"] > 0
    for decode, prof in result["profiles"].items():
        assert (tmp_path / f"profile_tta8_{decode}.txt").read_text().strip()
        assert prof["train"]["wall_s"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["paths"].keys() == {"cpu", "gpu"}


def test_bench_refuses_an_unknown_data_path_before_measuring(tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml", TOY + [f"bench.work_dir={tmp_path}", "bench.paths=[cpu,dali]"])
    with pytest.raises(UserError, match="data.decode must be one of"):
        run_bench(cfg)
    assert not list(tmp_path.iterdir())  # nothing generated or measured
