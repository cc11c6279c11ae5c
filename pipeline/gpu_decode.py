"""JPEG bytes to same-size uint8 image batches on a device: nvJPEG on CUDA, libjpeg on the CPU.

The GPU data path's first half. Loader workers only read file bytes (`image_bytes`); the process
that owns the device decodes a whole batch at once (`decode_jpegs`), shrinks big images
by whole factors with an area average (what the CPU path's reduced-scale libjpeg decode does),
and resizes them to one size (`resize_to`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import cv2
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.errors import BadImageError
from pipeline.gpu_augment import on_device

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they work, and this path
# runs in a prefetch thread, where `warnings.catch_warnings` is not safe
warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

REDUCE_FACTORS = (8, 4, 2)


def reduce_factor(height: int, width: int, min_side: int | None) -> int:
    """The largest of 8, 4, 2 that keeps the short side >= `min_side` (1: no reduction)."""
    if min_side:
        for factor in REDUCE_FACTORS:
            if min(height, width) // factor >= min_side:
                return factor
    return 1


def reduce(image: Tensor, min_side: int | None) -> Tensor:
    """(C, H, W) or (B, C, H, W) uint8 shrunk by `reduce_factor` with an area average, as uint8."""
    factor = reduce_factor(image.shape[-2], image.shape[-1], min_side)
    if factor == 1:
        return image
    batch = image if image.ndim == 4 else image[None]
    pooled = F.avg_pool2d(batch.float(), factor, ceil_mode=True).round_().clamp_(0, 255).to(torch.uint8)
    return pooled if image.ndim == 4 else pooled[0]


def by_shape(images: Sequence[Tensor | None]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the images, grouped by shape (None skipped): one kernel per group, not per image."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        if im is not None:
            groups.setdefault(tuple(im.shape), []).append(i)
    return groups


def reduce_all(images: list[Tensor | None], min_side: int | None) -> list[Tensor | None]:
    """`reduce` on each image, images of one shape together."""
    out = list(images)
    for shape, idx in by_shape(images).items():
        if reduce_factor(shape[-2], shape[-1], min_side) == 1:
            continue
        for i, im in zip(idx, reduce(torch.stack([images[i] for i in idx]), min_side).unbind(), strict=True):
            out[i] = im
    return out


NOT_A_FILE_ERROR = (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))


def _decode(data: list[Tensor], device: torch.device) -> list[Tensor]:
    if device.type == "cuda":
        # torchvision allocates the outputs on this stream but writes them from its own, which
        # does not wait for this one: memory freed here by kernels still queued could be reused
        torch.cuda.current_stream(device).synchronize()
    out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return out if isinstance(out, list) else [out]


def decode_jpegs(data: Sequence[Tensor], paths: Sequence[str], device: torch.device | str,
                 min_side: int | None = None, skip_bad: bool = False) -> list[Tensor | None]:
    """Decode a batch of JPEG byte tensors (on the CPU) to (3, H, W) uint8 images on `device`.

    All at once (nvJPEG batches on CUDA); if that fails, one at a time to find the bad file:
    a `BadImageError` naming it, or with `skip_bad` a None in its place and a warning. EXIF
    orientation is not applied (nor by the CPU path's reduced-scale decode). Out of
    memory or a device error is not a bad file: raised as is.
    """
    device = torch.device(device)
    try:
        images: list[Tensor | None] = list(_decode(list(data), device))
    except NOT_A_FILE_ERROR:
        raise
    except RuntimeError:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the failed call's queued work is done before a retry
        images = [_decode_one(tensor, path, device, skip_bad) for tensor, path in zip(data, paths, strict=True)]
    return reduce_all(images, min_side)


def _decode_one(tensor: Tensor, path: str, device: torch.device, skip_bad: bool) -> Tensor | None:
    """One image on `device`. One that nvJPEG or libjpeg-turbo's strict mode refuses (a JPEG
    flavour it lacks, or damage OpenCV tolerates) is decoded by OpenCV, as on the CPU path, so
    both paths accept the same files; one that OpenCV cannot decode either is a bad file."""
    try:
        return _decode([tensor], device)[0]
    except NOT_A_FILE_ERROR:
        raise
    except RuntimeError as err:
        error = err
    image = cv2.imdecode(tensor.numpy(), cv2.IMREAD_COLOR)
    if image is not None:
        log.warning("%s: decoded by OpenCV on the CPU (%s could not: %s)", path, device, error)
        return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).to(device)
    if not skip_bad:
        raise BadImageError(f"{path}: cannot decode image (corrupt JPEG: {error})") from None
    log.warning("skipping unreadable image %s", path)
    return None


def resize_to(images: Sequence[Tensor], height: int, width: int, min_side: int | None = None) -> Tensor:
    """(3, h, w) uint8 images of any sizes -> one (B, 3, height, width) float batch in 0..255.

    Per shape, in one stacked pass: `reduce` (with `min_side`), then bilinear on pixel centres,
    as cv2.INTER_LINEAR (the CPU path's resize).
    """
    groups = by_shape(images)
    resized = {}
    for shape, idx in groups.items():
        stack = reduce(torch.stack([images[i] for i in idx]), min_side).float()
        if stack.shape[-2:] != (height, width):
            stack = F.interpolate(stack, size=(height, width), mode="bilinear", align_corners=False)
        resized[shape] = stack
    if len(resized) == 1:  # the usual case: one size of JPEG
        return next(iter(resized.values()))
    out = torch.empty((len(images), 3, height, width), device=images[0].device)
    for shape, idx in groups.items():
        out[on_device(torch.tensor(idx), out)] = resized[shape]
    return out
