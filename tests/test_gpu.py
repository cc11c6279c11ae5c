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
