"""Images from disk to uint8 batches: OpenCV decode, albumentations, loaders, the per-fold DataModule.

Batches leave the loader as uint8 (B, H, W, C); the model normalises them on the device, which
moves a quarter of the bytes of float32 and is already channels-last once permuted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.config import AugConfig, Config, DataConfig, ModelConfig
from pipeline.diagnosis import diagnosis_labels
from pipeline.errors import BadImageError, UserError
from pipeline.gpu_loader import DeviceLoader, DeviceTransform, resolve_decode
from pipeline.image_bytes import read_image_bytes, read_jpeg_bytes
from pipeline.merge import COMPETITION_SOURCE
from pipeline.metadata import encode_metadata

log = logging.getLogger(__name__)

# One OpenCV thread per process, set before any loader forks: each of N workers would otherwise
# start a pool the size of the machine (N x cores threads starving the process that feeds the
# GPU), and changing the pool inside a forked worker deadlocks once the parent has used it.
cv2.setNumThreads(1)


REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_shape(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, without decoding; None if not found."""
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in SOF_MARKERS:
            return int.from_bytes(head[i + 5:i + 7], "big"), int.from_bytes(head[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    return None


def decode_flag(head: bytes, min_side: int | None) -> int:
    """Decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several times faster) when the
    image stays at least `min_side` px on its short side: a 512-px JPEG for a 256-px model."""
    shape = jpeg_shape(head) if min_side else None
    if shape:
        for factor, flag in REDUCED.items():
            if min(shape) // factor >= min_side:
                return flag
    return cv2.IMREAD_COLOR


def read_image(path: str, min_side: int | None = None) -> np.ndarray:
    """Decode an image to RGB uint8 (H, W, 3), naming the file if it is missing or corrupt.

    With `min_side`, a JPEG much larger than needed is decoded at a reduced scale.
    """
    data = read_image_bytes(path)
    head = data[:65536].tobytes()
    image = cv2.imdecode(data, decode_flag(head, min_side)) if data.size else None
    if image is None:
        raise BadImageError(f"{path}: cannot decode image (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


EVAL_RESIZES = ("full", "center_crop")


def eval_transform(data: DataConfig) -> A.Compose:
    """Validation and test, nothing random: the whole image resized to the model's input
    (`full`), or resized to image_size and centre-cropped (`center_crop`)."""
    if data.eval_resize == "full":
        return A.Compose([A.Resize(data.crop_size, data.crop_size)])
    if data.eval_resize == "center_crop":
        return A.Compose([
            A.Resize(data.image_size, data.image_size),
            A.CenterCrop(data.crop_size, data.crop_size),
        ])
    raise UserError(f"data.eval_resize must be one of {list(EVAL_RESIZES)}, got {data.eval_resize!r}")


def _walk(transform) -> Iterator:
    yield transform
    for child in getattr(transform, "transforms", ()):
        yield from _walk(child)


def seed_transform(transform: A.BaseCompose, seed: int) -> None:
    """Give the pipeline and every transform in it its own random stream derived from `seed`.

    albumentations' `set_random_seed` hands every child the same seed, so transforms with the
    same probability (the flips and the transpose) would fire together; here each gets its own.
    Parents are seeded before their children, whose own seed then replaces the inherited one.
    """
    nodes = list(_walk(transform))
    for node, child_seed in zip(nodes, np.random.SeedSequence(seed).generate_state(len(nodes)), strict=True):
        node.set_random_seed(int(child_seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker start: reseed the dataset's augmentations from the worker's torch seed
    (base seed + worker id), so workers draw different augmentations, reproducibly under a
    fixed torch seed. Forked workers otherwise all continue the parent's random state.
    Lightning's own worker seeding (numpy, random) runs first: a loader with a worker_init_fn
    does not get Lightning's."""
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        seed_transform(transform, info.seed % 2**32)


def train_transform(data: DataConfig, aug: AugConfig) -> A.Compose:
    """The blog's training augmentations: flips, transpose, affine, colour, blur/noise, dropout."""
    hole = (0.05, 0.15)
    return A.Compose([
        A.Resize(data.image_size, data.image_size),
        A.RandomCrop(data.crop_size, data.crop_size),
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.Transpose(p=aug.transpose),
        A.Affine(translate_percent=(-aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale),
                 rotate=(-aug.rotate, aug.rotate), border_mode=cv2.BORDER_REFLECT_101, p=aug.affine),
        A.OneOf([
            A.RandomBrightnessContrast(0.2, 0.2),
            A.HueSaturationValue(10, 20, 10),
        ], p=aug.color),
        A.OneOf([
            A.GaussianBlur(blur_limit=(3, 5)),
            A.GaussNoise(std_range=(0.02, 0.08)),
        ], p=aug.blur_noise),
        A.CoarseDropout(num_holes_range=(1, aug.dropout_holes), hole_height_range=hole,
                        hole_width_range=hole, p=aug.dropout),
    ])


class ImageDataset(Dataset):
    """Images by path with optional targets.

    Holds numpy arrays only (fixed-width bytes for paths): no Python objects whose reference
    counts would make each worker copy the table page by page.
    """

    def __init__(self, paths, targets=None, is_2020=None, transform: A.Compose | None = None,
                 skip_bad: bool = False, min_side: int | None = None, meta=None, labels=None,
                 jpeg_bytes: bool = False):
        self.paths = np.asarray(paths, dtype=np.bytes_)
        n = len(self.paths)
        self.targets = np.zeros(n, np.float32) if targets is None else np.asarray(targets, np.float32)
        self.is_2020 = np.ones(n, bool) if is_2020 is None else np.asarray(is_2020, bool)
        self.transform = transform
        self.skip_bad = skip_bad
        self.min_side = min_side
        self.meta = None if meta is None else np.asarray(meta, np.float32)
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        self.jpeg_bytes = jpeg_bytes  # the GPU path: the file's bytes, decoded on the device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict | None:
        path = self.paths[i].decode()
        try:
            image = read_jpeg_bytes(path) if self.jpeg_bytes else read_image(path, self.min_side)
        except BadImageError:
            if not self.skip_bad:
                raise
            log.warning("skipping unreadable image %s", path)
            return None
        if self.jpeg_bytes:
            item = {"jpeg": torch.from_numpy(image), "path": path}
        else:
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            item = {"image": torch.from_numpy(np.ascontiguousarray(image))}
        item |= {
            "target": self.targets[i],
            "is_2020": self.is_2020[i],
            "index": i,
        }
        if self.meta is not None:
            item["meta"] = torch.from_numpy(self.meta[i])
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


def collate(items: list[dict | None]) -> dict:
    """Default collation minus skipped images; `n_skipped` says how many were dropped.
    JPEG bytes (the GPU path) differ in length: they stay a list."""
    kept = [it for it in items if it is not None]
    if not kept:
        return {"image": torch.empty(0, dtype=torch.uint8), "n_skipped": len(items)}
    jpegs = [it.pop("jpeg") for it in kept] if "jpeg" in kept[0] else None
    batch = default_collate(kept)
    if jpegs is not None:
        batch["jpeg"] = jpegs
    batch["n_skipped"] = len(items) - len(kept)
    return batch


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool,
                device_transform: DeviceTransform | None = None) -> DataLoader:
    """The loader of a dataset; with `device_transform` (a bytes dataset, the GPU path) one whose
    batches come out decoded and augmented on the transform's device."""
    kwargs = dict(batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                  collate_fn=collate, worker_init_fn=seed_worker)
    if device_transform is None:
        return DataLoader(dataset, **kwargs)
    return DeviceLoader(dataset, device_transform=device_transform, **kwargs)


def decode_min_side(data: DataConfig) -> int | None:
    """The short side a JPEG must keep when decoded at reduced scale (None: full decode)."""
    return data.image_size if data.reduced_decode else None


def dataset_from_frame(df: pd.DataFrame, data: DataConfig, transform: A.Compose | None,
                       model: ModelConfig | None = None, where: str = "table",
                       with_labels: bool = False, jpeg_bytes: bool = False) -> ImageDataset:
    """A dataset over a table's `image_path` (and `target`, `source` where present); the metadata
    when `model` uses it, and with `with_labels` (a loss is computed) the diagnosis labels.
    `jpeg_bytes`: items carry the file's bytes for the GPU path instead of a decoded image."""
    model = model or ModelConfig()
    targets = df["target"].to_numpy() if "target" in df else None
    is_2020 = (df["source"] == COMPETITION_SOURCE).to_numpy() if "source" in df else None
    labels = None
    if with_labels and model.target == "diagnosis" and targets is not None:
        if "diagnosis" not in df:
            raise UserError(f"{where}: model.target=diagnosis needs a 'diagnosis' column; "
                            f"found {list(df.columns)}")
        labels = diagnosis_labels(df["diagnosis"], df["target"], where)
    return ImageDataset(df["image_path"].to_numpy(), targets, is_2020, transform,
                        data.skip_bad_images, decode_min_side(data),
                        encode_metadata(df) if model.metadata else None, labels, jpeg_bytes)


def frame_loader(df: pd.DataFrame, data: DataConfig, device: torch.device | str, batch_size: int,
                 aug: AugConfig | None = None, seed: int = 0, model: ModelConfig | None = None,
                 where: str = "table", with_labels: bool = False, shuffle: bool = False,
                 num_workers: int | None = None) -> DataLoader:
    """The loader over a table's images for a model on `device`, by `data.decode`: decoded and
    augmented in the loader workers (cpu), or bytes from the workers decoded and augmented on the
    device (gpu). `aug` None: the evaluation resize; otherwise the training crop and augmentations,
    their random stream seeded by `seed` (on the CPU path each loader worker then reseeds its own
    copy from the worker seed, see `seed_worker`)."""
    workers = data.num_workers if num_workers is None else num_workers
    if resolve_decode(data.decode, device) == "gpu":
        ds = dataset_from_frame(df, data, None, model, where, with_labels, jpeg_bytes=True)
        transform = DeviceTransform(data, device, aug, seed, decode_min_side(data))
        return make_loader(ds, batch_size, workers, shuffle, transform)
    if aug is None:
        transform = eval_transform(data)
    else:
        transform = train_transform(data, aug)
        seed_transform(transform, seed)
    ds = dataset_from_frame(df, data, transform, model, where, with_labels)
    return make_loader(ds, batch_size, workers, shuffle)


@dataclass
class FoldSplit:
    train: pd.DataFrame
    valid: pd.DataFrame


def split_fold(folds: pd.DataFrame, fold: int) -> FoldSplit:
    """Train on every other fold plus the train-only rows (fold -1); validate on `fold`."""
    if fold not in set(folds["fold"]):
        raise UserError(f"fold {fold} is not in the folds file (folds: {sorted(set(folds['fold']))})")
    valid = folds[folds["fold"] == fold].reset_index(drop=True)
    train = folds[folds["fold"] != fold].reset_index(drop=True)
    if valid["target"].nunique() < 2:
        log.warning("fold %d: validation has a single class: its AUC is undefined (NaN)", fold)
    return FoldSplit(train, valid)


class FoldDataModule(pl.LightningDataModule):
    """Loaders for one fold of the folds table."""

    def __init__(self, cfg: Config, split: FoldSplit, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.split = split
        self.seed = seed

    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    def train_dataloader(self) -> DataLoader:
        d = self.cfg.data
        return frame_loader(self.split.train, d, self.device(), d.batch_size, aug=self.cfg.train.aug,
                            seed=self.seed, model=self.cfg.model, where="training rows", with_labels=True,
                            shuffle=True)

    def val_dataloader(self) -> DataLoader:
        d = self.cfg.data
        return frame_loader(self.split.valid, d, self.device(), d.batch_size, model=self.cfg.model,
                            where="validation rows", with_labels=True)
