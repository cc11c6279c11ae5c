"""Checks that need CUDA: run with `pytest -m gpu` on a GPU machine; skipped elsewhere."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.model import load_model
from pipeline.predict import predict_logits
from pipeline.train import fold_dir, resolve_precision, train_fold
from pipeline.tta import VIEWS
from tests.conftest import make_tiny_set

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_mixed_precision_fit_channels_last_and_tta_on_device(tmp_path):
    folds, overrides = make_tiny_set(tmp_path, n_patients=16, size=64)
    cfg = load_config(None, overrides + ["train.epochs=2", "data.num_workers=2"])
    assert resolve_precision(cfg.train.precision) == "16-mixed"
    oof = train_fold(cfg, 0, folds)
    assert oof["pred"].notna().all() and np.isfinite(oof["pred"]).all()
    model = load_model(str(fold_dir(cfg, 0) / "best.ckpt"), cfg.model, "cuda")
    model.setup("predict")
    assert next(model.net.parameters()).is_cuda
    from pipeline.data import ImageDataset, eval_transform, make_loader
    ds = ImageDataset(folds["image_path"].to_numpy(), transform=eval_transform(cfg.data))
    index, logits = predict_logits([model], make_loader(ds, 16, 2, False), list(VIEWS),
                                   torch.device("cuda"))
    assert logits.shape == (1, 8, len(folds)) and np.isfinite(logits).all()
    assert sorted(index) == list(range(len(folds)))


def real_jpegs() -> list[str]:
    from tests.conftest import REAL
    paths = sorted(str(p) for p in (REAL / "images").glob("*.jpg"))
    if not paths:
        pytest.skip(f"no real JPEGs under {REAL / 'images'}")
    return paths


def test_nvjpeg_decode_matches_the_cpu_decode_on_real_jpegs():
    from pipeline.gpu_decode import decode_jpegs
    from pipeline.image_bytes import read_jpeg_bytes
    paths = real_jpegs()
    data = [torch.from_numpy(read_jpeg_bytes(p)) for p in paths]
    for min_side in (None, 200):  # full size, and 1/2 scale for the 512-px files
        on_gpu = decode_jpegs(data, paths, "cuda", min_side)
        on_cpu = decode_jpegs(data, paths, "cpu", min_side)
        for path, g, c in zip(paths, on_gpu, on_cpu, strict=True):
            assert g.is_cuda and g.shape == c.shape, path
            assert (g.cpu().float() - c.float()).abs().mean() <= 2, path


def test_gpu_loader_on_cuda_skips_a_bad_file_keeps_rows_aligned_and_does_not_grow(tmp_path):
    import pandas as pd

    from pipeline.config import AugConfig, DataConfig
    from pipeline.data import frame_loader
    paths = real_jpegs()[:20]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9")
    frame = pd.DataFrame({"image_path": [*paths[:7], str(bad), *paths[7:]], "target": 0.0})
    frame["target"] = np.arange(len(frame), dtype=float)
    data = DataConfig(decode="gpu", image_size=160, crop_size=128, num_workers=2, skip_bad_images=True)
    loader = frame_loader(frame, data, "cuda", 8, AugConfig(), seed=3)
    used = []
    for _ in range(3):
        rows, skipped = [], 0
        for batch in loader:
            assert batch["image"].is_cuda and batch["image"].dtype == torch.uint8
            assert batch["image"].shape[1:] == (128, 128, 3)
            assert len(batch["image"]) == len(batch["index"]) == len(batch["target"])
            assert (batch["target"].numpy() == batch["index"].numpy()).all()  # still aligned
            rows += batch["index"].tolist()
            skipped += batch["n_skipped"]
        torch.cuda.synchronize()
        used.append(torch.cuda.memory_allocated())
        assert skipped == 1 and sorted(rows) == [i for i in range(len(frame)) if i != 7]
    assert used[2] == used[1]


def test_training_on_the_gpu_data_path_finishes_with_finite_oof(tmp_path):
    folds, overrides = make_tiny_set(tmp_path, n_patients=16, size=64)
    cfg = load_config(None, overrides + ["train.epochs=1", "data.num_workers=2", "data.decode=gpu",
                                         "train.precision=bf16-mixed"])
    oof = train_fold(cfg, 0, folds)
    assert oof["pred"].notna().all() and np.isfinite(oof["pred"]).all()


def test_augment_ops_on_cuda_match_the_same_ops_on_the_cpu():
    from dataclasses import replace

    from pipeline.config import AugConfig
    from pipeline.gpu_augment import augment, random_crop, to_uint8_hwc
    aug = replace(AugConfig(), blur_noise=0.0)  # the noise comes from each device's own generator
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 72, 72, generator=gen) * 255
    out = {}
    for device in ("cpu", "cuda"):
        g = torch.Generator().manual_seed(7)
        out[device] = to_uint8_hwc(augment(random_crop(x.to(device), 64, g), aug, g)).cpu()
    assert (out["cpu"].float() - out["cuda"].float()).abs().mean() < 0.5


def test_gpu_path_eval_batches_on_cuda_match_the_cpu_run_of_the_same_path():
    import pandas as pd

    from pipeline.config import DataConfig
    from pipeline.data import frame_loader
    frame = pd.DataFrame({"image_path": real_jpegs(), "target": 0.0})
    data = DataConfig(decode="gpu", image_size=224, crop_size=224, num_workers=2)
    batches = {d: torch.cat([b["image"].cpu() for b in frame_loader(frame, data, d, 16)]) for d in ("cpu", "cuda")}
    assert batches["cpu"].shape == batches["cuda"].shape == (len(frame), 224, 224, 3)
    per_image = (batches["cpu"].float() - batches["cuda"].float()).abs().mean(dim=(1, 2, 3))
    assert per_image.max() <= 2
