"""The GPU data path, run on CPU tensors: each op's geometry and colour against OpenCV and
albumentations, per-image randomness and seeding, decode against cv2 on the real JPEGs, bad
files through the loader, and a short training run with data.decode=gpu."""

import re
from dataclasses import replace

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import gpu_augment as G
from pipeline.config import AugConfig, DataConfig, load_config
from pipeline.data import frame_loader, read_image
from pipeline.errors import BadImageError, UserError
from pipeline.gpu_decode import decode_jpegs, reduce, reduce_factor
from pipeline.gpu_loader import DeviceTransform, resolve_decode
from pipeline.image_bytes import read_jpeg_bytes
from pipeline.train import train_fold
from tests.conftest import REAL, make_tiny_set

IMAGES = REAL / "images"
NO_AUG = AugConfig(hflip=0, vflip=0, transpose=0, affine=0, color=0, blur_noise=0, dropout=0)


# ---------------------------------------------------------------- helpers

def batch_of(*images: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 images -> float (B, 3, H, W) in 0..255."""
    return torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images]).float()


def image_of(x: torch.Tensor, i: int = 0) -> np.ndarray:
    """Image i of a float batch as (H, W, 3) float, rounded and clipped like the uint8 output."""
    return x[i].permute(1, 2, 0).round().clamp(0, 255).numpy()


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


def albu(transform, image: np.ndarray) -> np.ndarray:
    return transform(image=image)["image"].astype(float)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A colourful image without pixel-level detail (interpolation schemes agree on it)."""
    small = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def square_image(n: int = 32, top: int = 8, left: int = 10, side: int = 6) -> np.ndarray:
    """Black, with a bright square off-centre and a dimmer bar: no flip or rotation symmetry."""
    img = np.zeros((n, n, 3), np.uint8)
    img[top:top + side, left:left + side] = 255
    img[n // 2 + 4:n // 2 + 6, n // 2 - 2:n // 2 + 8] = 120
    return img


def centroid(img: np.ndarray, level: int = 200) -> np.ndarray:
    """(row, col) centre of the pixels brighter than `level`."""
    return np.argwhere(img[..., 0] > level).mean(0)


def affine_params(h: int, w: int, dx: float = 0, dy: float = 0, scale: float = 1,
                  angle: float = 0) -> G.AffineParams:
    """One image's affine with a shift in pixels."""
    return G.AffineParams(torch.tensor([True]), torch.tensor([[dx / w, dy / h]]),
                          torch.tensor([float(scale)]), torch.tensor([float(angle)]))


def albu_affine(img: np.ndarray, dx: int = 0, dy: int = 0, scale: float = 1, angle: float = 0):
    return albu(A.Affine(translate_px={"x": dx, "y": dy}, scale=(scale, scale), rotate=(angle, angle),
                         border_mode=cv2.BORDER_REFLECT_101, p=1), img)


def write_jpeg(path, image: np.ndarray) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return str(path)


def loader_images(paths, decode: str, batch_size: int = 64, **data) -> list[dict]:
    df = pd.DataFrame({"image_path": [str(p) for p in paths], "target": np.arange(len(paths)) % 2})
    cfg = DataConfig(decode=decode, num_workers=0, **data)
    return list(frame_loader(df, cfg, "cpu", batch_size))


@pytest.fixture
def real_jpegs() -> list[str]:
    paths = sorted(str(p) for p in IMAGES.glob("*.jpg"))
    if not paths:
        pytest.skip(f"real JPEGs not found at {IMAGES}")
    return paths


# ---------------------------------------------------------------- 1. geometry and colour per op

def test_flips_and_transpose_match_torch():
    x = torch.arange(8 * 3 * 6 * 6, dtype=torch.float).view(8, 3, 6, 6)  # every pixel distinct
    combos = torch.tensor([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=torch.bool)
    out = G.flips(x, combos[:, 0], combos[:, 1], combos[:, 2])
    for i, (h, v, t) in enumerate(combos.tolist()):
        want = x[i]
        want = want.flip(-1) if h else want
        want = want.flip(-2) if v else want
        want = want.transpose(-2, -1) if t else want
        assert torch.equal(out[i], want), (h, v, t)


def test_crop_windows_and_center_crop():
    x = torch.arange(3 * 3 * 10 * 12, dtype=torch.float).view(3, 3, 10, 12)
    top, left = torch.tensor([0, 2, 5]), torch.tensor([0, 7, 3])
    out = G.crop(x, top, left, 5)
    for i in range(3):
        assert torch.equal(out[i], x[i, :, top[i]:top[i] + 5, left[i]:left[i] + 5])
    # random_crop: each image gets some in-bounds window of its own
    out = G.random_crop(x, 5, torch.Generator().manual_seed(0))
    corners = [divmod(int(out[i, 0, 0, 0] - x[i, 0, 0, 0]), 12) for i in range(3)]
    for i, (r, c) in enumerate(corners):
        assert torch.equal(out[i], x[i, :, r:r + 5, c:c + 5])
    assert len(set(corners)) > 1
    odd = smooth_image(37, 40)
    assert np.array_equal(image_of(G.center_crop(batch_of(odd), 30)), albu(A.CenterCrop(30, 30), odd))


@pytest.mark.parametrize("dx, dy", [(5, 0), (0, -3), (-4, 6)])
def test_affine_shift_moves_like_albumentations(dx, dy):
    img = square_image()
    out = image_of(G.affine(batch_of(img), affine_params(32, 32, dx, dy)))
    np.testing.assert_allclose(centroid(out), centroid(img) + [dy, dx], atol=1e-6)
    m = max(abs(dx), abs(dy))  # the borders filled by reflection: reflect vs reflect-101
    assert np.abs(out - albu_affine(img, dx, dy))[m:-m, m:-m].max() <= 1


@pytest.mark.parametrize("angle, k", [(90, 1), (-90, -1)])
def test_rotation_90_matches_rot90_and_albumentations(angle, k):
    img = square_image()
    out = image_of(G.affine(batch_of(img), affine_params(32, 32, angle=angle)))
    inner = np.s_[3:-3, 3:-3]
    assert mad(out[inner], np.rot90(img, k)[inner]) < 0.5
    assert mad(out[inner], albu_affine(img, angle=angle)[inner]) < 0.5
    assert mad(out[inner], np.rot90(img, -k)[inner]) > 10  # the other direction is far off


@pytest.mark.parametrize("h, w", [(96, 96), (64, 128)])
@pytest.mark.parametrize("dx, dy, scale, angle", [(10, -5, 1.1, 30), (-7, 9, 0.9, -40)])
def test_affine_shift_scale_rotate_matches_albumentations(h, w, dx, dy, scale, angle):
    img = smooth_image(h, w)
    out = image_of(G.affine(batch_of(img), affine_params(h, w, dx, dy, scale, angle)))
    ref = albu_affine(img, dx, dy, scale, angle)
    inner = np.s_[h // 2 - 12:h // 2 + 12, w // 2 - 12:w // 2 + 12]  # sampled from inside the image
    assert mad(out[inner], ref[inner]) < 0.5
    assert mad(out[inner], img[inner]) > 5  # it did move


def test_affine_only_touches_images_switched_on():
    x = batch_of(smooth_image(32, 32, 1), smooth_image(32, 32, 2))
    p = G.AffineParams(torch.tensor([False, True]), torch.full((2, 2), 0.1), torch.ones(2),
                       torch.full((2,), 20.0))
    out = G.affine(x, p)
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])


def test_rgb_hsv_round_trip_and_cv2_conversion():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    img[:4] = 0
    img[4:8] = 255
    img[8:12] = 128  # greys: hue undefined, saturation 0
    x = batch_of(img)
    hsv = G.rgb_to_hsv(x)
    assert (G.hsv_to_rgb(hsv) - x).abs().max() < 1e-2
    ref = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)  # H in degrees, S, V in 0..1
    np.testing.assert_allclose(hsv[0].permute(1, 2, 0).numpy(), ref, atol=1e-2)


@pytest.mark.parametrize("hue", [7, -9, 60])
def test_hue_shift_matches_cv2_uint8_hsv(hue):
    img = smooth_image(64, 64)
    zero = torch.zeros(1)
    assert np.array_equal(image_of(G.hue_saturation_value(batch_of(img), zero, zero, zero)), img)
    out = image_of(G.hue_saturation_value(batch_of(img), torch.tensor([float(hue)]), zero, zero))
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(int)
    hsv[..., 0] = (hsv[..., 0] + hue) % 180  # OpenCV's uint8 hue: half-degrees, 0..179
    ref = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    assert mad(out, ref) < 1 and np.abs(out - ref).max() <= 6
    assert mad(out, img) > 2  # the shift did something


@pytest.mark.parametrize("sat, val", [(15, 0), (0, -10), (-20, 8)])
def test_saturation_value_shift_matches_albumentations(sat, val):
    img = smooth_image(64, 64)
    out = image_of(G.hue_saturation_value(batch_of(img), torch.zeros(1), torch.tensor([float(sat)]),
                                          torch.tensor([float(val)])))
    ref = albu(A.HueSaturationValue((0, 0), (sat, sat), (val, val), p=1), img)
    assert mad(out, ref) < 1 and np.abs(out - ref).max() <= 6


def test_brightness_contrast_formula_per_image():
    img = smooth_image(32, 32)
    x = batch_of(img, img)
    alpha, beta = torch.tensor([1.2, 0.85]), torch.tensor([0.1, -0.2])
    out = G.brightness_contrast(x, alpha, beta)
    for i in range(2):
        want = (x[i] * alpha[i] + beta[i] * 255).clamp(0, 255)
        assert torch.allclose(out[i], want)
        c, b = float(alpha[i]) - 1, float(beta[i])
        ref = albu(A.RandomBrightnessContrast((b, b), (c, c), p=1), img)
        assert np.abs(image_of(out, i) - ref).max() <= 1


def test_blur_kernels_and_against_cv2():
    ksize, sigma = torch.tensor([3, 5, 5]), torch.tensor([1.0, 2.0, 0.7])
    k = G.gaussian_kernels(ksize, sigma)
    assert torch.allclose(k.sum(1), torch.ones(3))
    assert torch.equal(k[0, [0, 4]], torch.zeros(2)) and (k[0, 1:4] > 0).all()  # a 3-kernel in 5
    assert (k[1:] > 0).all() and torch.allclose(k, k.flip(1))
    constant = torch.full((3, 3, 16, 16), 77.0)
    assert torch.allclose(G.blur(constant, k), constant)
    img = smooth_image(40, 40) // 2 + np.random.default_rng(1).integers(0, 128, (40, 40, 3), np.uint8)
    out = G.blur(batch_of(img, img, img), k)
    for i in range(3):
        kk = int(ksize[i])
        ref = cv2.GaussianBlur(img, (kk, kk), float(sigma[i]), borderType=cv2.BORDER_REFLECT_101)
        assert np.abs(image_of(out, i) - ref).max() <= 1
    assert mad(image_of(out, 1), img) > 5


def test_noise_std_per_image_and_seeded():
    x = torch.full((2, 3, 64, 64), 128.0)
    std = torch.tensor([0.02, 0.08])
    out = G.noise(x, std, seed=3)
    assert torch.equal(out, G.noise(x, std, seed=3)) and not torch.equal(out, G.noise(x, std, seed=4))
    measured = (out - x).std(dim=(1, 2, 3))
    assert torch.allclose(measured, std * 255, rtol=0.05)


def test_hole_mask_boxes_where_drawn():
    boxes = torch.tensor([[[1, 2, 4, 6], [5, 5, 7, 8]], [[0, 0, 2, 2], [3, 3, 8, 8]]])
    on = torch.tensor([[True, True], [True, False]])
    mask = G.hole_mask(boxes, on, 8, 10, torch.device("cpu"))
    want = np.zeros((2, 1, 8, 10), bool)
    for i, j in zip(*np.nonzero(on.numpy()), strict=True):
        top, left, bottom, right = boxes[i, j].tolist()
        want[i, 0, top:bottom, left:right] = True
    assert np.array_equal(mask.numpy(), want)


def test_dropout_zeros_holes_within_limits():
    aug = replace(NO_AUG, dropout=1.0, dropout_holes=3)
    gen = torch.Generator().manual_seed(0)
    boxes, on = G.draw_holes(gen, 64, 100, 80, aug)
    assert (on.sum(1) >= 1).all() and (on.sum(1) <= 3).all()
    hh, ww = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    assert hh.min() >= 5 and hh.max() <= 15 and ww.min() >= 4 and ww.max() <= 12
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= 100).all() and (boxes[..., 3] <= 80).all()
    x = torch.full((8, 3, 100, 80), 200.0)
    out = G.augment(x, aug, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 200.0}
    zeros = (out == 0).float().mean(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 3 * 0.15**2).all()


def test_one_of_masks_disjoint_at_rate():
    first, second = G.one_of(torch.Generator().manual_seed(0), 4000, 0.3)
    assert not (first & second).any()
    assert abs((first | second).float().mean() - 0.3) < 0.03
    assert abs(first.float().mean() - second.float().mean()) < 0.03


# ---------------------------------------------------------------- 2, 3. randomness, dtype, shapes

def augment_same_image(seed: int, aug: AugConfig | None = None, n: int = 16) -> torch.Tensor:
    x = batch_of(smooth_image(48, 48)).expand(n, -1, -1, -1).contiguous()
    return G.augment(x, aug or AugConfig(), torch.Generator().manual_seed(seed))


def test_augment_params_differ_per_image_and_repeat_per_seed():
    out = augment_same_image(0)
    assert len({o.numpy().tobytes() for o in out}) >= 12  # images drawn alike are rare
    always = augment_same_image(0, AugConfig(affine=1.0))  # a continuous draw for every image
    assert len({o.numpy().tobytes() for o in always}) == 16
    assert torch.equal(out, augment_same_image(0))
    assert not torch.equal(out, augment_same_image(1))


def test_to_uint8_hwc_of_augment_in_range():
    x = augment_same_image(2, AugConfig(affine=1.0, color=1.0, blur_noise=1.0))
    assert x.min() >= 0 and x.max() <= 255
    out = G.to_uint8_hwc(x)
    assert out.dtype == torch.uint8 and out.shape == (16, 48, 48, 3)
    assert torch.equal(out.permute(0, 3, 1, 2).float(), x.round())


@pytest.mark.parametrize("eval_resize", ["full", "center_crop"])
def test_device_transform_shapes(tmp_path, eval_resize):
    paths = [write_jpeg(tmp_path / f"{i}.jpg", smooth_image(h, w, i))
             for i, (h, w) in enumerate([(40, 50), (64, 64), (300, 200), (64, 64)])]
    data = DataConfig(decode="gpu", image_size=48, crop_size=40, eval_resize=eval_resize)

    def run(aug):
        batch = {"jpeg": [torch.from_numpy(read_jpeg_bytes(p)) for p in paths], "path": paths,
                 "target": torch.arange(4.0)}
        return DeviceTransform(data, "cpu", aug, min_side=48)(batch)

    for aug in (None, AugConfig()):
        out = run(aug)
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (4, 40, 40, 3)
        assert out["n_skipped"] == 0 and torch.equal(out["target"], torch.arange(4.0))


# ---------------------------------------------------------------- 4. decode against cv2

def decoded(paths, min_side=None) -> list[np.ndarray]:
    data = [torch.from_numpy(read_jpeg_bytes(p)) for p in paths]
    return [im.permute(1, 2, 0).numpy() for im in decode_jpegs(data, paths, "cpu", min_side)]


def assert_close_to_cv2(paths, min_side=None):
    for path, im in zip(paths, decoded(paths, min_side), strict=True):
        ref = read_image(path, min_side)
        assert im.shape == ref.shape, path
        assert mad(im, ref) <= 2, path


def test_decode_matches_cv2_full_and_reduced(real_jpegs, tmp_path):
    assert_close_to_cv2(real_jpegs)
    big = [p for p in real_jpegs if min(cv2.imread(p).shape[:2]) >= 512]
    assert big, "no 512-px image among the real JPEGs"
    assert reduce_factor(512, 512, 256) == 2
    assert_close_to_cv2(big, 256)  # cv2.IMREAD_REDUCED_COLOR_2
    full = read_image(big[0])
    for h, w, min_side, factor in [(1024, 1024, 256, 4), (1024, 1024, 128, 8), (766, 1021, 300, 2)]:
        path = write_jpeg(tmp_path / f"{h}x{w}.jpg", cv2.resize(full, (w, h), interpolation=cv2.INTER_CUBIC))
        assert reduce_factor(h, w, min_side) == factor
        assert_close_to_cv2([path], min_side)
        whole = decode_jpegs([torch.from_numpy(read_jpeg_bytes(path))], [path], "cpu")[0]
        assert mad(reduce(whole, min_side).permute(1, 2, 0).numpy(), read_image(path, min_side)) <= 2


def test_decode_grey_jpeg_as_rgb(tmp_path):
    grey = smooth_image(40, 40)[..., 0]
    path = str(tmp_path / "grey.jpg")
    cv2.imwrite(path, grey)
    (im,) = decoded([path])
    assert im.shape == (40, 40, 3) and mad(im, read_image(path)) <= 2


@pytest.mark.parametrize("eval_resize", ["full", "center_crop"])
def test_device_eval_batch_matches_cpu_path(real_jpegs, eval_resize):
    cpu, gpu = (loader_images(real_jpegs, decode, eval_resize=eval_resize)[0] for decode in ("cpu", "gpu"))
    assert gpu["image"].shape == cpu["image"].shape == (len(real_jpegs), 224, 224, 3)
    per_image = (gpu["image"].float() - cpu["image"].float()).abs().mean(dim=(1, 2, 3))
    assert per_image.max() <= 2 and per_image.mean() <= 1


# ---------------------------------------------------------------- 5. bad files

@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Four distinct good JPEGs, a corrupt one (end marker present, garbage inside), a truncated
    one and a PNG."""
    out = {f"good{i}": write_jpeg(tmp_path / f"good{i}.jpg", smooth_image(48, 48, i)) for i in range(4)}
    data = open(out["good0"], "rb").read()
    garbage = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8" + garbage + b"\xff\xd9")
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    cv2.imwrite(str(tmp_path / "image.png"), smooth_image(48, 48))
    return out | {k: str(tmp_path / f"{k}.{ext}")
                  for k, ext in [("corrupt", "jpg"), ("truncated", "jpg"), ("image", "png")]}


def test_corrupt_jpeg_passes_the_truncation_check(files):
    read_jpeg_bytes(files["corrupt"])  # reaches the decoder
    with pytest.raises(BadImageError, match="truncated"):
        read_jpeg_bytes(files["truncated"])


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
@pytest.mark.parametrize("bad", ["corrupt", "truncated"])
def test_bad_jpeg_raises_naming_the_file(files, decode, bad):
    with pytest.raises(BadImageError, match=re.escape(files[bad])):
        loader_images([files["good0"], files[bad], files["good1"]], decode)


def test_skipped_rows_dropped_and_fields_stay_aligned(files):
    names = ["good0", "corrupt", "good1", "truncated", "good2", "good3"]
    paths = [files[n] for n in names]
    (cpu,) = loader_images(paths, "cpu", skip_bad_images=True)
    (gpu,) = loader_images(paths, "gpu", skip_bad_images=True)
    kept = [i for i, n in enumerate(names) if n.startswith("good")]
    for batch in (cpu, gpu):
        assert batch["n_skipped"] == 2
        assert batch["index"].tolist() == kept
        assert batch["target"].tolist() == [i % 2 for i in kept]
    per_image = (gpu["image"].float() - cpu["image"].float()).abs().mean(dim=(1, 2, 3))
    assert per_image.max() <= 2  # each kept image is its own row's


def test_batch_of_only_unreadable_files_is_skipped(files):
    (batch,) = loader_images([files["truncated"]], "gpu", skip_bad_images=True)
    assert batch["n_skipped"] == 1 and len(batch["image"]) == 0


def test_non_jpeg_on_gpu_path_names_the_file(files):
    with pytest.raises(BadImageError, match=re.escape(files["image"]) + ": not a JPEG.*data.decode=cpu"):
        loader_images([files["image"]], "gpu")
    assert loader_images([files["image"]], "cpu")[0]["image"].shape == (1, 224, 224, 3)


# ---------------------------------------------------------------- 6. resolve_decode

@pytest.mark.parametrize("mode, device, want", [
    ("auto", "cpu", "cpu"), ("auto", "cuda", "gpu"), ("auto", "cuda:1", "gpu"),
    ("cpu", "cuda", "cpu"), ("gpu", "cpu", "gpu"),
])
def test_resolve_decode(mode, device, want):
    assert resolve_decode(mode, device) == want


def test_resolve_decode_unknown_mode_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"'cpu', 'gpu', 'auto'.*'nvjpeg'"):
        resolve_decode("nvjpeg", "cpu")


# ---------------------------------------------------------------- 7. training through the GPU path

def test_short_training_run_with_gpu_decode(tmp_path, monkeypatch):
    calls, original = [], DeviceTransform.__call__

    def counted(self, batch):
        calls.append(self.aug is not None)
        return original(self, batch)

    monkeypatch.setattr(DeviceTransform, "__call__", counted)
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["data.decode=gpu", "train.epochs=1"])
    oof = train_fold(cfg, 0, folds)
    assert len(oof) == (folds["fold"] == 0).sum() and np.isfinite(oof["pred"]).all()
    assert True in calls and False in calls  # training and validation batches both went through it


# ---------------------------------------------------------------- 8. the prefetch thread

class Doubling:
    """A stand-in transform: doubles `x`; raises on the batch numbered `fail_at`."""

    device = torch.device("cpu")

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.seen = fail_at, 0

    def __call__(self, batch):
        self.seen += 1
        if batch["n"] == self.fail_at:
            raise BadImageError(f"batch {batch['n']}: broken")
        return {"n": batch["n"], "x": batch["x"] * 2}


def numbered(n: int):
    return ({"n": i, "x": torch.full((2,), float(i))} for i in range(n))


def test_prefetch_thread_gives_every_batch_in_order_then_stops():
    from pipeline.gpu_loader import _Prefetcher
    out = list(_Prefetcher(numbered(7), Doubling(), depth=2))
    assert [b["n"] for b in out] == list(range(7))
    assert all((b["x"] == 2 * b["n"]).all() for b in out)


def test_prefetch_thread_error_reaches_the_consumer_once():
    from pipeline.gpu_loader import _Prefetcher
    it = _Prefetcher(numbered(7), Doubling(fail_at=3), depth=2)
    assert [next(it)["n"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(BadImageError, match="batch 3: broken"):
        next(it)
    with pytest.raises(StopIteration):  # finished: no hang on a later call
        next(it)


def test_prefetch_thread_of_a_pass_left_early_stops_when_dropped():
    import gc

    from pipeline.gpu_loader import _Prefetcher
    transform = Doubling()
    it = _Prefetcher(numbered(1000), transform, depth=2)
    next(it)
    thread = it.thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive() and transform.seen < 10  # it stopped, not ran to the end


# ---------------------------------------------------------------- 9. loaders on the GPU path

def test_random_tta_passes_on_the_gpu_path_repeat_with_loader_workers(tmp_path):
    """The augmentations are drawn in the process that owns the device, in batch order: a seeded
    random pass repeats whatever the worker count (the CPU path needs one process for that)."""
    folds, _ = make_tiny_set(tmp_path, n_patients=6, size=48)
    data = DataConfig(decode="gpu", image_size=48, crop_size=40, num_workers=2)

    def images(seed: int, workers: int) -> torch.Tensor:
        loader = frame_loader(folds, data, "cpu", 8, AugConfig(), seed=seed, num_workers=workers)
        return torch.cat([b["image"] for b in loader])

    first = images(5, 2)
    assert torch.equal(first, images(5, 2)) and torch.equal(first, images(5, 0))
    assert not torch.equal(first, images(6, 2))


def test_lightning_rebuilds_a_gpu_path_loader_with_a_distributed_sampler(tmp_path):
    """DDP: Lightning re-creates a loader with its DistributedSampler; the device transform must
    survive, whether the loader was made in a data hook or passed to fit directly."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, DistributedSampler

    from pipeline.gpu_loader import DeviceLoader
    folds, _ = make_tiny_set(tmp_path, n_patients=4, size=48)
    data = DataConfig(decode="gpu", image_size=48, crop_size=40, num_workers=0)
    with _replace_dunder_methods(DataLoader, "dataset"):
        in_hook = frame_loader(folds, data, "cpu", 4)
    direct = frame_loader(folds, data, "cpu", 4)
    for loader in (in_hook, direct):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=False)
        rebuilt = _update_dataloader(loader, sampler)
        assert isinstance(rebuilt, DeviceLoader) and rebuilt.device_transform is loader.device_transform
        rows = torch.cat([b["index"] for b in rebuilt])
        assert sorted(rows.tolist()) == list(range(1, len(folds), 2))  # rank 1's half
        assert all(b["image"].shape[1:] == (40, 40, 3) for b in rebuilt)


@pytest.mark.parametrize("sx, sy, angle", [(1.15, 0.85, 30.0), (0.9, 1.1, -40.0)])
def test_affine_scales_x_and_y_apart_like_albumentations(sx, sy, angle):
    """A.Affine draws x and y scales independently (keep_ratio=False) and scales before it
    rotates; swapping the axes is measurably wrong, so the test can tell."""
    img = smooth_image(96, 96)
    want = albu(A.Affine(scale={"x": (sx, sx), "y": (sy, sy)}, rotate=(angle, angle),
                         border_mode=cv2.BORDER_REFLECT_101, p=1), img)

    def warped(scale_x: float, scale_y: float) -> np.ndarray:
        p = G.AffineParams(torch.tensor([True]), torch.zeros(1, 2), torch.tensor([[scale_x, scale_y]]),
                           torch.tensor([angle]))
        return image_of(G.affine(batch_of(img), p))

    inner = (slice(16, -16), slice(16, -16))
    assert mad(warped(sx, sy)[inner], want[inner]) < 1
    assert mad(warped(sy, sx)[inner], want[inner]) > 2


def test_draw_affine_gives_each_axis_its_own_scale_in_range():
    p = G.draw_affine(torch.Generator().manual_seed(0), 256, AugConfig(scale=0.15))
    assert p.scale.shape == (256, 2) and not torch.equal(p.scale[:, 0], p.scale[:, 1])
    assert p.scale.min() >= 0.85 and p.scale.max() <= 1.15


def test_zero_dropout_holes_is_refused_by_name():
    with pytest.raises(UserError, match="train.aug.dropout_holes"):
        G.draw_holes(torch.Generator(), 4, 32, 32, AugConfig(dropout_holes=0))


def test_a_jpeg_only_opencv_tolerates_is_read_alike_on_both_paths(tmp_path):
    """Damaged scan data with intact headers: libjpeg-turbo's strict decode (torchvision, and
    nvJPEG on CUDA) refuses it, OpenCV decodes it with a warning. The GPU path falls back to
    OpenCV for that file, so both paths accept the same files and give the same pixels."""
    ok, data = cv2.imencode(".jpg", smooth_image(64, 64))
    raw = bytearray(data.tobytes())
    sos = raw.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big")  # the entropy-coded data
    raw[scan + 10:scan + 12] = b"\xff\x99"  # a marker that does not exist, mid-scan
    path = tmp_path / "damaged.jpg"
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError):
        from torchvision.io import decode_jpeg
        decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    (gpu,) = loader_images([str(path)], "gpu", image_size=64, crop_size=64)
    (cpu,) = loader_images([str(path)], "cpu", image_size=64, crop_size=64)
    assert gpu["n_skipped"] == cpu["n_skipped"] == 0
    assert torch.equal(gpu["image"], cpu["image"])


def test_both_paths_draw_augmentations_from_the_same_distribution():
    """600 augmentations of one image on each path: the brightness of the images, its spread
    (colour ops and their probability), the share of dropped-out pixels (cutout), the contrast
    left in each image, and the mean image (geometry) agree within sampling noise."""
    from pipeline.data import seed_transform, train_transform
    img = smooth_image(64, 64)
    n, aug = 600, AugConfig()
    transform = train_transform(DataConfig(image_size=64, crop_size=64), aug)
    seed_transform(transform, 0)
    cpu = np.stack([transform(image=img)["image"] for _ in range(n)]).astype(float)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().repeat(n, 1, 1, 1)
    gpu = G.to_uint8_hwc(G.augment(x, aug, torch.Generator().manual_seed(0))).numpy().astype(float)

    def stats(a: np.ndarray) -> np.ndarray:
        return np.array([a.mean(), a.mean(axis=(1, 2, 3)).std(), (a.sum(-1) == 0).mean(),
                         a.std(axis=(1, 2, 3)).mean()])

    c, g = stats(cpu), stats(gpu)
    assert abs(c[0] - g[0]) < 2
    assert (np.abs(g[1:] - c[1:]) <= np.array([0.12, 0.35, 0.04]) * c[1:]).all(), (c, g)
    noise = mad(cpu[: n // 2].mean(0), cpu[n // 2:].mean(0))  # the CPU path against itself
    assert mad(cpu.mean(0), gpu.mean(0)) < 1.5 * noise
