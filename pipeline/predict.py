"""Run a fold model over a loader: one decode per image, the TTA views applied on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.model import MelanomaModel
from pipeline.tta import View, predict_views


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for inference on CUDA (bf16 where supported); full precision on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def with_meta(model: MelanomaModel, meta: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function of images alone; views stacked k-fold get the metadata k times."""
    if meta is None:
        return model
    return lambda x: model(x, meta.repeat(x.shape[0] // meta.shape[0], 1))


@torch.inference_mode()
def predict_logits(
    models: Sequence[MelanomaModel], loader: DataLoader, views: Sequence[View | str],
    device: torch.device | None = None, desc: str = "predict", max_forward_batch: int = 512,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset row indices (N,) and logits (M, V, N): every model on every view of each batch.

    Each image is decoded once however many models and views see it; on CUDA up to
    `max_forward_batch` images (views of one batch) go through a model together. Outputs stay on the
    device until the end, so the loop never waits on a copy back. Rows whose image was skipped
    as unreadable are absent from the indices.
    """
    device = device or default_device()
    models = [m.to(device).eval() for m in models]
    if device.type == "cuda":
        for m in models:
            m.net.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device)
    indices, logits = [], []
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2, disable=not progress):
        if batch["image"].numel() == 0:
            continue
        images = batch["image"].to(device, non_blocking=True)
        meta = batch["meta"].to(device, non_blocking=True) if "meta" in batch else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits.append(torch.stack([
                predict_views(with_meta(m, meta), m.normalize(images), views, max_forward_batch)
                for m in models]))
        indices.append(batch["index"])
    if not logits:
        return np.zeros(0, np.int64), np.zeros((len(models), len(views), 0), np.float32)
    return torch.cat(indices).numpy(), torch.cat(logits, dim=2).float().cpu().numpy()
