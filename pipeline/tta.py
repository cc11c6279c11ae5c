"""Test-time augmentation: the 8 dihedral views of a square, as named pure tensor functions.

Each view works on `(B, C, H, W)` tensors on any device and has an inverse that undoes it
(ttach style). Views are applied on the device to one decoded batch, so an image is read and
decoded once however many views are predicted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import rankdata
from torch import Tensor

from pipeline.errors import UserError

log = logging.getLogger(__name__)

TensorFn = Callable[[Tensor], Tensor]
COMBINE_METHODS = ("mean", "logit", "rank")


MAX_FORWARD_BATCH = 512  # images in one batched multi-view forward


def identity(x: Tensor) -> Tensor:
    """The image as it is."""
    return x


def hflip(x: Tensor) -> Tensor:
    """Mirror left-right (flip the width axis)."""
    return x.flip(-1)


def vflip(x: Tensor) -> Tensor:
    """Mirror top-bottom (flip the height axis)."""
    return x.flip(-2)


def rot90(x: Tensor) -> Tensor:
    """Rotate 90 degrees counter-clockwise; H and W swap."""
    return torch.rot90(x, 1, dims=(-2, -1))


def rot180(x: Tensor) -> Tensor:
    """Rotate 180 degrees."""
    return torch.rot90(x, 2, dims=(-2, -1))


def rot270(x: Tensor) -> Tensor:
    """Rotate 270 degrees counter-clockwise (90 clockwise); H and W swap."""
    return torch.rot90(x, 3, dims=(-2, -1))


def transpose(x: Tensor) -> Tensor:
    """Reflect across the main diagonal; H and W swap."""
    return x.transpose(-2, -1)


def antitranspose(x: Tensor) -> Tensor:
    """Reflect across the anti-diagonal: out[i, j] = x[W-1-j, H-1-i]; H and W swap."""
    return x.flip(-2, -1).transpose(-2, -1)


@dataclass(frozen=True)
class View:
    """One TTA view: a pure tensor function and the function that undoes it."""

    name: str
    forward: TensorFn
    inverse: TensorFn


VIEWS: dict[str, View] = {
    "identity": View("identity", identity, identity),
    "hflip": View("hflip", hflip, hflip),
    "vflip": View("vflip", vflip, vflip),
    "rot90": View("rot90", rot90, rot270),
    "rot180": View("rot180", rot180, rot180),
    "rot270": View("rot270", rot270, rot90),
    "transpose": View("transpose", transpose, transpose),
    "antitranspose": View("antitranspose", antitranspose, antitranspose),
}


def get_views(names: Sequence[str]) -> list[View]:
    """Look views up by name, in the given order; an unknown name is an error listing the valid ones."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise UserError(f"unknown TTA view(s) {unknown}; valid views: {list(VIEWS)}")
    if not names:
        raise UserError(f"no TTA views given; valid views: {list(VIEWS)}")
    return [VIEWS[n] for n in names]


def _as_views(views: Sequence[View | str]) -> list[View]:
    return [v if isinstance(v, View) else get_views([v])[0] for v in views]


def _flat_logits(out: Tensor, batch: int) -> Tensor:
    """Model output (B,) or (B, 1) as float (B,)."""
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (batch,):
        raise ValueError(
            f"model_fn must return logits of shape ({batch},) or ({batch}, 1), got {tuple(out.shape)}"
        )
    return out.float()


@torch.no_grad()
def predict_views(
    model_fn: Callable[[Tensor], Tensor], images: Tensor, views: Sequence[View | str],
    max_forward_batch: int = MAX_FORWARD_BATCH,
) -> Tensor:
    """Logits of `model_fn` on each view of one decoded batch: a `(V, B)` tensor on the batch's device.

    `images` is `(B, C, H, W)`, uint8 or float, already on the device; each view is a cheap
    tensor op there. Normalisation, if any, belongs in `model_fn`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    batch = images.shape[0]
    outs = [v.forward(images) for v in _as_views(views)]
    if any(o.shape != outs[0].shape for o in outs):  # rot90/transpose of a non-square batch
        return torch.stack([_flat_logits(model_fn(o), batch) for o in outs])
    # on a GPU several views per forward: far fewer kernel launches, which bound a small model;
    # on a CPU one view at a time keeps the activations in cache
    per_forward = max(1, max_forward_batch // batch) if images.is_cuda else 1
    chunks = [torch.cat(outs[i:i + per_forward]) for i in range(0, len(outs), per_forward)]
    logits = torch.cat([_flat_logits(model_fn(c), len(c)) for c in chunks])
    return logits.view(len(outs), batch)


def _to_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (ties averaged) divided by its length: values in (0, 1]."""
    return rankdata(values, method="average", axis=-1) / values.shape[-1]


def combine_views(logits: Tensor | np.ndarray, how: str = "mean") -> np.ndarray:
    """Combine `(V, N)` logits of V views into `(N,)` probabilities in [0, 1].

    mean: mean of the views' sigmoid probabilities; logit: sigmoid of the mean logit;
    rank: mean of each view's percentile ranks (a score in (0, 1], not a calibrated probability).
    """
    values = _to_numpy(logits)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"logits must be (V, N) with V >= 1, got shape {values.shape}")
    if how == "mean":
        return expit(values).mean(axis=0)
    if how == "logit":
        return expit(values.mean(axis=0))
    if how == "rank":
        return percentile_ranks(values).mean(axis=0)
    raise UserError(f"unknown view average {how!r}; valid: {list(COMBINE_METHODS)}")
