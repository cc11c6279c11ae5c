"""`make bench`: speed figures measured side by side in one run, printed as ratios.

- training images/s: the Lightning fold trainer vs a plain PyTorch AMP loop (same model,
  loader, batches, optimizer, schedule and precision), alternated `repeats` times;
- the loader alone (decode + augment) vs plain cv2 decoding of the same files;
- the model-bound rate (uint8 tensors already on the device) and end-to-end / model-bound;
- TTA inference images/s with one view and with 8, next to the forward rate on device tensors;
- the ensemble of 50 files x 11k rows, and folds on 60k rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from pipeline.atomic import atomic_write_text
from pipeline.config import Config, FoldsConfig, SyntheticConfig
from pipeline.data import (
    ImageDataset,
    decode_min_side,
    eval_transform,
    make_loader,
    train_transform,
)
from pipeline.ensemble import blend_by_model
from pipeline.errors import UserError
from pipeline.folds import make_folds
from pipeline.model import MelanomaModel
from pipeline.predict import amp_dtype, default_device, predict_logits
from pipeline.provenance import git_commit
from pipeline.synthetic import generate_synthetic
from pipeline.train import build_trainer, resolve_precision
from pipeline.tta import VIEWS

log = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device) -> Iterator[list[float]]:
    """Wall time of the block, with the device drained at both ends."""
    out: list[float] = []
    sync(device)
    start = time.perf_counter()
    yield out
    sync(device)
    out.append(time.perf_counter() - start)


def bench_images(cfg: Config) -> np.ndarray:
    """Paths of `n_images` synthetic lesion JPEGs of `jpeg_size` px (made once, then reused)."""
    b = cfg.bench
    root = Path(b.work_dir) / f"jpeg{b.jpeg_size}"
    folder = root / "jpeg" / "train"
    if not folder.is_dir() or len(list(folder.glob("*.jpg"))) < min(b.n_images, 1024):
        # ~18 images a patient; at most ~1,000 distinct files, cycled beyond that
        n_patients = max(4, min(b.n_images, 1024) // 16 + 2)
        generate_synthetic(SyntheticConfig(out_dir=str(root), n_patients=n_patients, n_test_patients=2,
                                           n_external_lesions=1, image_size=b.jpeg_size,
                                           positive_rate=0.3, n_jobs=os.cpu_count() or 2))
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    return np.resize(np.array(paths), b.n_images)


def bench_cfg(cfg: Config) -> Config:
    """The experiment config with the benchmark's model and sizes."""
    b = cfg.bench
    data = replace(cfg.data, image_size=b.crop_size, crop_size=b.crop_size, batch_size=b.batch_size,
                   num_workers=b.num_workers)
    model = replace(cfg.model, backbone=b.backbone, pretrained=False, weights_path=None)
    return replace(cfg, data=data, model=model)


def train_dataset(cfg: Config, paths: np.ndarray) -> ImageDataset:
    targets = np.arange(len(paths)) % 5 == 0
    return ImageDataset(paths, targets, None, train_transform(cfg.data, cfg.train.aug),
                        min_side=decode_min_side(cfg.data))


class StepTimer(Callback):
    """Times training batches `warmup` .. `steps - 1` inside the Lightning loop."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.seconds = warmup, steps, float("nan")
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.steps - 1:
            sync(pl_module.device)
            self.seconds = time.perf_counter() - self._start


def lightning_rate(cfg: Config, paths: np.ndarray) -> float:
    """Images/s of the fold trainer (checkpointing, loggers, progress bar and all)."""
    b = cfg.bench
    run = replace(cfg, train=replace(cfg.train, epochs=1, limit_train_batches=b.train_steps,
                                     limit_val_batches=0))
    timer = StepTimer(b.warmup_steps, b.train_steps)
    out = Path(b.work_dir) / "lightning"
    trainer = build_trainer(run, out, [timer])
    loader = make_loader(train_dataset(run, paths), b.batch_size, b.num_workers, train=True)
    model = MelanomaModel.from_configs(run.model, run.train)
    trainer.fit(model, train_dataloaders=loader)
    return (b.train_steps - b.warmup_steps) * b.batch_size / timer.seconds


class PlainLoop:
    """The blog's hand-written AMP training step: the fold trainer's model, loss, AdamW, OneCycle
    and precision, without Lightning."""

    def __init__(self, cfg: Config, device: torch.device, total_steps: int):
        precision = resolve_precision(cfg.train.precision)
        self.dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
        self.device = device
        self.model = MelanomaModel.from_configs(cfg.model, cfg.train).to(device).train()
        if device.type == "cuda":
            self.model.net.to(memory_format=torch.channels_last)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=t.lr,
                                                             total_steps=total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def step(self, batch: dict) -> None:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss, _, _ = self.model.model_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def plain_rate(cfg: Config, paths: np.ndarray, device: torch.device) -> float:
    """Images/s of the plain loop on the same loader and batches as the fold trainer."""
    b = cfg.bench
    loop = PlainLoop(cfg, device, b.train_steps)
    loader = make_loader(train_dataset(cfg, paths), b.batch_size, b.num_workers, train=True)
    start = 0.0
    for i, batch in enumerate(loader):
        if i == b.warmup_steps:
            sync(device)
            start = time.perf_counter()
        loop.step(batch)
        if i == b.train_steps - 1:
            break
    sync(device)
    return (b.train_steps - b.warmup_steps) * b.batch_size / (time.perf_counter() - start)


def model_bound_rate(cfg: Config, device: torch.device) -> float:
    """Training images/s with uint8 batches already on the device: the ceiling for the loader."""
    b = cfg.bench
    loop = PlainLoop(cfg, device, b.train_steps)
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 255, (b.batch_size, b.crop_size, b.crop_size, 3), generator=gen,
                                    dtype=torch.uint8).to(device),
             "target": (torch.arange(b.batch_size) % 5 == 0).float().to(device)}
    return b.batch_size / per_call(lambda: loop.step(batch), b.warmup_steps,
                                   b.train_steps - b.warmup_steps, device)


def per_call(fn: Callable[[], object], warmup: int, calls: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    with stopwatch(device) as t:
        for _ in range(calls):
            fn()
    return t[0] / calls


def loader_rates(cfg: Config, paths: np.ndarray) -> dict:
    """Decode + augment through the loader vs a plain cv2 decode loop over the same files."""
    b = cfg.bench
    n = min(len(paths), b.batch_size * b.train_steps)
    cpu = torch.device("cpu")
    with stopwatch(cpu) as plain:
        for p in paths[:n]:
            cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    rates = {"cv2_decode_1proc": n / plain[0]}
    for workers in sorted({0, b.num_workers}):
        loader = make_loader(train_dataset(cfg, paths[:n]), b.batch_size, workers, train=False)
        it = iter(loader)
        next(it)  # workers started, first batch out
        with stopwatch(cpu) as t:
            count = sum(len(batch["target"]) for batch in it)
        rates[f"loader_decode_augment_{workers}workers"] = count / t[0]
    return rates


def tta_rates(cfg: Config, paths: np.ndarray, device: torch.device) -> dict:
    """TTA images/s end to end (1 view, 8 views) and the forward rate on device-resident tensors."""
    b = cfg.bench
    model = MelanomaModel.from_configs(cfg.model, cfg.train).to(device).eval()
    if device.type == "cuda":
        model.net.to(memory_format=torch.channels_last)
    batch = cfg.infer.batch_size
    images = torch.randint(0, 255, (batch, b.crop_size, b.crop_size, 3), dtype=torch.uint8).to(device)
    dtype = amp_dtype(device)
    rates = {}
    for name, view in VIEWS.items():
        @torch.inference_mode()
        def forward(view=view) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(view.forward(model.normalize(images)))
        rates[f"forward_{name}"] = batch / per_call(forward, 2, 5, device)
    ds = ImageDataset(paths, None, None, eval_transform(cfg.data),
                      min_side=decode_min_side(cfg.data))
    loader = make_loader(ds, batch, b.num_workers, train=False)  # workers persist across passes
    predict_logits([model], loader, ["identity"], device, desc="warm-up")
    for label, views in (("tta_1view", ["identity"]), ("tta_8views", list(VIEWS))):
        with stopwatch(device) as t:
            predict_logits([model], loader, views, device, desc=label)
        rates[label] = len(paths) / t[0]
    rates["forward"] = rates["forward_identity"]
    rates["tta_8views_vs_forward_over_8"] = rates["tta_8views"] / (rates["forward"] / 8)
    return rates


def ensemble_seconds(cfg: Config) -> float:
    b = cfg.bench
    folder = Path(b.work_dir) / "ensemble"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = np.array([f"ISIC_{i:07d}" for i in range(b.ensemble_rows)])
    paths = []
    for i in range(b.ensemble_files):
        path = folder / f"submission{i}.csv"
        pd.DataFrame({"image_name": rng.permutation(ids), "target": rng.random(len(ids))}).to_csv(path, index=False)
        paths.append(path)
    members = pd.DataFrame({"experiment": "bench", "fold": np.arange(len(paths)) % 5,
                            "checkpoint": "best", "path": [str(p) for p in paths]})
    with stopwatch(torch.device("cpu")) as t:  # what make ensemble runs: views per model, then rank
        blend_by_model(members, "rank", "mean")
    return t[0]


def folds_seconds(cfg: Config) -> float:
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 60, size=cfg.bench.folds_rows // 30)
    patients = np.repeat(np.arange(len(sizes)), sizes)[: cfg.bench.folds_rows]
    df = pd.DataFrame({"image_name": [f"I{i}" for i in range(len(patients))],
                       "patient_id": [f"P{p}" for p in patients],
                       "target": (rng.random(len(patients)) < 0.0176).astype(int),
                       "source": "isic2020"})
    with stopwatch(torch.device("cpu")) as t:
        make_folds(df, FoldsConfig())
    return t[0]


def run_bench(cfg: Config) -> dict:
    """All figures in one run; the JSON lands in bench.work_dir, the table in the log."""
    cfg = bench_cfg(cfg)
    device = default_device()
    b = cfg.bench
    if b.n_images < b.batch_size * b.train_steps:
        raise UserError(f"bench.n_images={b.n_images} gives fewer than bench.train_steps="
                        f"{b.train_steps} batches of {b.batch_size}: raise n_images")
    paths = bench_images(cfg)
    pl.seed_everything(0, verbose=False)
    light, plain = [], []
    for _ in range(b.repeats):  # alternated, so drift in machine speed hits both alike
        light.append(lightning_rate(cfg, paths))
        plain.append(plain_rate(cfg, paths, device))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "git_commit": git_commit(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": resolve_precision(cfg.train.precision),
        "bench": asdict(b),
        "train_lightning_img_s": max(light), "train_plain_img_s": max(plain),
        "train_lightning_runs": light, "train_plain_runs": plain,
    }
    result["lightning_vs_plain"] = result["train_lightning_img_s"] / result["train_plain_img_s"]
    result["model_bound_img_s"] = model_bound_rate(cfg, device)
    result["end_to_end_vs_model_bound"] = result["train_lightning_img_s"] / result["model_bound_img_s"]
    result.update(loader_rates(cfg, paths))
    result.update(tta_rates(cfg, paths, device))
    result["ensemble_50x11k_s"] = ensemble_seconds(cfg)
    result["folds_60k_s"] = folds_seconds(cfg)
    out = Path(b.work_dir) / "bench.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("benchmark (%s, %s, %s %dpx from %dpx JPEGs, batch %d):\n%s\nwritten to %s",
             result["device"], result["precision"], b.backbone, b.crop_size, b.jpeg_size,
             b.batch_size, format_result(result), out)
    return result


def format_result(r: dict) -> str:
    lines = [
        f"train  Lightning fold trainer   {r['train_lightning_img_s']:9.1f} img/s",
        f"train  plain PyTorch AMP loop   {r['train_plain_img_s']:9.1f} img/s   "
        f"ratio {r['lightning_vs_plain']:.3f} (goal >= 0.97)",
        f"train  model-bound (on device)  {r['model_bound_img_s']:9.1f} img/s   "
        f"end-to-end / model-bound {r['end_to_end_vs_model_bound']:.3f} (goal >= 0.90 on GPU)",
    ]
    for k, v in r.items():
        if k.startswith(("cv2_", "loader_")):
            lines.append(f"data   {k:<30} {v:9.1f} img/s")
    for k in [k for k in r if k.startswith("forward_")]:
        lines.append(f"infer  {k:<30} {r[k]:9.1f} img/s")
    lines += [
        f"infer  TTA 1 view end to end       {r['tta_1view']:9.1f} img/s",
        f"infer  TTA 8 views end to end      {r['tta_8views']:9.1f} img/s   "
        f"vs forward/8: {r['tta_8views_vs_forward_over_8']:.3f} (goal >= 0.90)",
        f"ens    50 files x 11k rows (rank)  {r['ensemble_50x11k_s']:9.3f} s",
        f"folds  60k rows                    {r['folds_60k_s']:9.3f} s",
    ]
    return "\n".join(lines)
