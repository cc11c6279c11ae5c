"""Batched augmentations on the device: the families and probabilities of `data.train_transform`.

Every op is a pure function of a float (B, C, H, W) batch in 0..255 and per-image parameters.
The parameters are drawn on the CPU from a `torch.Generator` (`draw_*`), so which images an op
touches is known on the host and nothing waits on the device; the same seed gives the same
parameters, and each image of a batch gets its own. The ops run on CPU tensors too, which is how
the tests check them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from pipeline.config import AugConfig
from pipeline.errors import UserError

BLUR_SIGMA = (0.5, 3.0)  # albumentations GaussianBlur's default sigma_limit
NOISE_STD = (0.02, 0.08)  # GaussNoise(std_range): a share of 255
HOLE = (0.05, 0.15)  # CoarseDropout hole sides, a share of the image side
BRIGHTNESS = CONTRAST = 0.2
HUE, SATURATION, VALUE = 10, 20, 10  # HueSaturationValue's limits, OpenCV's uint8 HSV units


def uniform(gen: Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def chance(gen: Generator, n: int, p: float) -> Tensor:
    """(n,) bool: True with probability p, per image."""
    return torch.rand(n, generator=gen) < p


def on_device(t: Tensor, like: Tensor) -> Tensor:
    """A parameter tensor drawn on the CPU, on `like`'s device (floats in `like`'s dtype).

    On CUDA it goes through pinned memory without blocking: a copy from pageable memory would
    wait for every kernel queued on the stream, a stall per parameter.
    """
    dtype = like.dtype if t.is_floating_point() else t.dtype
    if like.is_cuda:
        return t.to(dtype).pin_memory().to(like.device, non_blocking=True)
    return t.to(like.device, dtype)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(on_device(mask, a)[:, None, None, None], a, b)


def crop(x: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """A size x size window of each image at its own (top, left)."""
    rows = on_device(top[:, None] + torch.arange(size), x)  # (B, size)
    cols = on_device(left[:, None] + torch.arange(size), x)
    b = torch.arange(len(x), device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_crop(x: Tensor, size: int, gen: Generator) -> Tensor:
    """albumentations RandomCrop, per image."""
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=gen)
    left = torch.randint(0, w - size + 1, (n,), generator=gen)
    return crop(x, top, left, size)


def center_crop(x: Tensor, size: int) -> Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def flips(x: Tensor, hflip: Tensor, vflip: Tensor, transpose: Tensor) -> Tensor:
    """Left-right flip, top-bottom flip, then transpose, each where its (B,) mask says."""
    x = _where(hflip, x.flip(-1), x)
    x = _where(vflip, x.flip(-2), x)
    return _where(transpose, x.transpose(-2, -1), x) if transpose.any() else x  # H != W: none


@dataclass
class AffineParams:
    """Per image: on/off, shift (a share of the side), scale, rotation in degrees."""

    on: Tensor
    shift: Tensor  # (B, 2): x, y
    scale: Tensor  # (B,) one for both axes, or (B, 2): x, y
    angle: Tensor


def draw_affine(gen: Generator, n: int, aug: AugConfig) -> AffineParams:
    """A.Affine's draws: x and y scaled independently (its default keep_ratio=False)."""
    return AffineParams(chance(gen, n, aug.affine), uniform(gen, 2 * n, -aug.shift, aug.shift).view(n, 2),
                        uniform(gen, 2 * n, 1 - aug.scale, 1 + aug.scale).view(n, 2),
                        uniform(gen, n, -aug.rotate, aug.rotate))


def affine(x: Tensor, p: AffineParams) -> Tensor:
    """Shift, scale and rotate about the centre in one `grid_sample`, borders reflected.

    Output pixel q samples the input at A^-1 (q - c - t) + c with A = R S (scale, then rotate,
    as albumentations composes them): rotation by `angle` (counter-clockwise on screen, like
    OpenCV's), scaling by `scale`, translation t = shift x side. grid_sample's reflection mirrors
    about the outer pixel edge (BORDER_REFLECT), the CPU path's BORDER_REFLECT_101 about the
    edge pixel: reflected borders differ by one pixel.
    """
    idx = p.on.nonzero()[:, 0]
    if len(idx) == 0:
        return x
    rad = torch.deg2rad(p.angle[idx])
    scale = p.scale[idx] if p.scale.ndim == 2 else p.scale[idx, None].expand(-1, 2)
    cos, sin, s = torch.cos(rad), torch.sin(rad), p.shift[idx]
    cx, sx = cos / scale[:, 0], sin / scale[:, 0]  # row x of S^-1 R^-1
    cy, sy = cos / scale[:, 1], sin / scale[:, 1]  # row y
    # grid coordinates are in [-1, 1] on each axis: a shift of f x side is 2f there; y grows
    # downwards; the rotation's cross terms carry the aspect ratio (a rotation in pixels)
    r = x.shape[-2] / x.shape[-1]
    theta = torch.stack([
        torch.stack([cx, -sx * r, -(cx * s[:, 0] - sx * r * s[:, 1]) * 2], 1),
        torch.stack([sy / r, cy, -(sy / r * s[:, 0] + cy * s[:, 1]) * 2], 1),
    ], 1)
    theta, sel = on_device(theta, x), on_device(idx, x)
    part = x[sel]
    grid = F.affine_grid(theta, list(part.shape), align_corners=False)
    out = x.clone()
    out[sel] = F.grid_sample(part, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out


def brightness_contrast(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """RandomBrightnessContrast: x * alpha + beta * 255 (alpha = 1 + contrast, beta = brightness)."""
    a, b = on_device(alpha, x)[:, None, None, None], on_device(beta, x)[:, None, None, None]
    return (x * a + b * 255).clamp_(0, 255)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """0..255 RGB -> H in [0, 360), S and V in [0, 1]."""
    rgb = x / 255
    v, imax = rgb.max(1)
    mn = rgb.min(1).values
    delta = v - mn
    s = torch.where(v > 0, delta / v.clamp_min(1e-8), torch.zeros_like(v))
    r, g, b = rgb.unbind(1)
    d = delta.clamp_min(1e-8)
    h = torch.where(imax == 0, (g - b) / d, torch.where(imax == 1, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, (h * 60) % 360, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv`, back to 0..255."""
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], 1)
    f = v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    return f * 255


def hue_saturation_value(x: Tensor, hue: Tensor, sat: Tensor, val: Tensor) -> Tensor:
    """HueSaturationValue in OpenCV's uint8 HSV units: hue in half-degrees, S and V out of 255."""
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0] + 2 * on_device(hue, x)[:, None, None]) % 360
    s = (hsv[:, 1] + on_device(sat, x)[:, None, None] / 255).clamp(0, 1)
    v = (hsv[:, 2] + on_device(val, x)[:, None, None] / 255).clamp(0, 1)
    return hsv_to_rgb(torch.stack([h, s, v], 1))


def gaussian_kernels(ksize: Tensor, sigma: Tensor, width: int = 5) -> Tensor:
    """(B, width) 1-D Gaussian kernels of odd size `ksize` (zero outside it), each summing to 1."""
    offsets = torch.arange(width) - width // 2
    k = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k * (offsets.abs()[None] <= ksize[:, None] // 2)
    return k / k.sum(1, keepdim=True)


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Separable blur with each image's own 1-D kernel, borders reflected (BORDER_REFLECT_101)."""
    n, c, h, w = x.shape
    width = kernels.shape[1]
    k = on_device(kernels, x).repeat_interleave(c, 0)  # (B*C, width)
    y = F.pad(x.reshape(1, n * c, h, w), [width // 2] * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


def noise(x: Tensor, std: Tensor, seed: int) -> Tensor:
    """Additive Gaussian noise per pixel and channel, std a share of 255, clipped to 0..255."""
    gen = torch.Generator(x.device).manual_seed(seed)
    z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return (x + z * on_device(std, x)[:, None, None, None] * 255).clamp_(0, 255)


def hole_mask(boxes: Tensor, on: Tensor, h: int, w: int, device: torch.device) -> Tensor:
    """(B, 1, H, W) True inside any active box; boxes (B, K, 4) as top, left, bottom, right in px."""
    ys = torch.arange(h, device=device)[None, None, :, None]
    xs = torch.arange(w, device=device)[None, None, None, :]
    b = on_device(boxes, ys)[..., None, None]
    inside = (ys >= b[:, :, 0]) & (ys < b[:, :, 2]) & (xs >= b[:, :, 1]) & (xs < b[:, :, 3])
    return (inside & on_device(on, ys)[:, :, None, None]).any(1, keepdim=True)


def draw_holes(gen: Generator, n: int, h: int, w: int, aug: AugConfig) -> tuple[Tensor, Tensor]:
    """CoarseDropout: on p = aug.dropout images, 1..dropout_holes boxes of 5-15% of each side."""
    k = aug.dropout_holes
    if k < 1:
        raise UserError(f"train.aug.dropout_holes must be at least 1, got {k} (no holes: train.aug.dropout=0)")
    count = torch.randint(1, k + 1, (n,), generator=gen)
    on = (torch.arange(k)[None] < count[:, None]) & chance(gen, n, aug.dropout)[:, None]
    hh = (uniform(gen, n * k, *HOLE) * h).long().clamp_min(1).view(n, k)
    ww = (uniform(gen, n * k, *HOLE) * w).long().clamp_min(1).view(n, k)
    top = (torch.rand(n, k, generator=gen) * (h - hh + 1)).long()
    left = (torch.rand(n, k, generator=gen) * (w - ww + 1)).long()
    return torch.stack([top, left, top + hh, left + ww], -1), on


def one_of(gen: Generator, n: int, p: float) -> tuple[Tensor, Tensor]:
    """albumentations OneOf of two equally weighted choices: (first, second) masks."""
    on = chance(gen, n, p)
    first = torch.rand(n, generator=gen) < 0.5
    return on & first, on & ~first


def augment(x: Tensor, aug: AugConfig, gen: Generator) -> Tensor:
    """The training augmentations after the crop, in `train_transform`'s order."""
    n, _, h, w = x.shape
    x = flips(x, chance(gen, n, aug.hflip), chance(gen, n, aug.vflip),
              chance(gen, n, aug.transpose) if h == w else torch.zeros(n, dtype=torch.bool))
    x = affine(x, draw_affine(gen, n, aug))
    bc, hsv = one_of(gen, n, aug.color)
    alpha, beta = uniform(gen, n, 1 - CONTRAST, 1 + CONTRAST), uniform(gen, n, -BRIGHTNESS, BRIGHTNESS)
    x = _where(bc, brightness_contrast(x, alpha, beta), x) if bc.any() else x
    if hsv.any():
        shifts = [uniform(gen, n, -lim, lim) for lim in (HUE, SATURATION, VALUE)]
        x = _where(hsv, hue_saturation_value(x, *shifts), x)
    blurred, noisy = one_of(gen, n, aug.blur_noise)
    if blurred.any():
        ksize = 3 + 2 * torch.randint(0, 2, (n,), generator=gen)
        x = _where(blurred, blur(x, gaussian_kernels(ksize, uniform(gen, n, *BLUR_SIGMA))), x)
    if noisy.any():
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        x = _where(noisy, noise(x, uniform(gen, n, *NOISE_STD), seed), x)
    boxes, on = draw_holes(gen, n, h, w, aug)
    if on.any():
        x = x.masked_fill(hole_mask(boxes, on, h, w, x.device), 0)
    return x


def to_uint8_hwc(x: Tensor) -> Tensor:
    """Float (B, C, H, W) 0..255 -> contiguous uint8 (B, H, W, C): the CPU loader's batch, whose
    permute back to (B, C, H, W) in the model is already channels-last (no copy per view)."""
    return x.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
