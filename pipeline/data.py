"""Images from disk to uint8 batches: OpenCV decode, albumentations, loaders, the per-fold DataModule.

Batches leave the loader as uint8 (B, H, W, C); the model normalises them on the device, which
moves a quarter of the bytes of float32 and is already channels-last once permuted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.cli import UserError
from pipeline.config import AugConfig, Config, DataConfig
from pipeline.merge import COMPETITION_SOURCE

log = logging.getLogger(__name__)


class BadImageError(UserError):
    """An image file is missing or cannot be decoded."""


def read_image(path: str) -> np.ndarray:
    """Decode a JPEG to RGB uint8 (H, W, 3), naming the file if it is missing or corrupt."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise BadImageError(f"{path}: cannot read image (missing or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def eval_transform(data: DataConfig) -> A.Compose:
    """Validation and test: resize, then centre crop; nothing random."""
    return A.Compose([
        A.Resize(data.image_size, data.image_size),
        A.CenterCrop(data.crop_size, data.crop_size),
    ])


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
                 skip_bad: bool = False):
        self.paths = np.asarray(paths, dtype=np.bytes_)
        n = len(self.paths)
        self.targets = np.zeros(n, np.float32) if targets is None else np.asarray(targets, np.float32)
        self.is_2020 = np.ones(n, bool) if is_2020 is None else np.asarray(is_2020, bool)
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict | None:
        path = self.paths[i].decode()
        try:
            image = read_image(path)
        except BadImageError:
            if not self.skip_bad:
                raise
            log.warning("skipping unreadable image %s", path)
            return None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "target": self.targets[i],
            "is_2020": self.is_2020[i],
            "index": i,
        }


def collate(items: list[dict | None]) -> dict:
    """Default collation minus skipped images; `n_skipped` says how many were dropped."""
    kept = [it for it in items if it is not None]
    if not kept:
        return {"image": torch.empty(0, dtype=torch.uint8), "n_skipped": len(items)}
    batch = default_collate(kept)
    batch["n_skipped"] = len(items) - len(kept)
    return batch


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0 and train,
        collate_fn=collate,
    )


def dataset_from_frame(df: pd.DataFrame, transform: A.Compose, skip_bad: bool) -> ImageDataset:
    targets = df["target"].to_numpy() if "target" in df else None
    is_2020 = (df["source"] == COMPETITION_SOURCE).to_numpy() if "source" in df else None
    return ImageDataset(df["image_path"].to_numpy(), targets, is_2020, transform, skip_bad)


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

    def __init__(self, cfg: Config, split: FoldSplit):
        super().__init__()
        self.cfg = cfg
        self.split = split

    def train_dataloader(self) -> DataLoader:
        d = self.cfg.data
        ds = dataset_from_frame(self.split.train, train_transform(d, self.cfg.train.aug), d.skip_bad_images)
        return make_loader(ds, d.batch_size, d.num_workers, train=True)

    def val_dataloader(self) -> DataLoader:
        d = self.cfg.data
        ds = dataset_from_frame(self.split.valid, eval_transform(d), d.skip_bad_images)
        return make_loader(ds, d.batch_size, d.num_workers, train=False)
