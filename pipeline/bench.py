"""`make bench`: speed figures measured side by side in one run, printed as ratios.

Each data path of `bench.paths` (cpu: decode + augment in the loader workers; gpu: workers
read bytes, the device decodes and augments) is measured on the same files and model:
- training images/s: the Lightning fold trainer vs a plain PyTorch AMP loop (same model,
  loader, batches, optimizer, schedule and precision), alternated `repeats` times, with the
  machine's busy cores and the share of time the loop waits for a batch;
- end to end / model-bound (uint8 tensors already on the device);
- the data path alone (no model): images/s, and on CUDA the device memory it takes and whether
  that grows over the batches;
- TTA inference images/s with one view and with 8, next to the forward rate on device tensors;
  with `bench.profile`, torch.profiler tables of an 8-view pass and of training steps.
Plus the ensemble of 50 files x 11k rows, and folds on 60k rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from pipeline.atomic import atomic_write_text
from pipeline.bench_probes import (
    WaitTimer,
    busy_cores,
    data_path_memory,
    profile_table,
    stopwatch,
    sync,
)
from pipeline.config import Config, FoldsConfig, SyntheticConfig
from pipeline.data import frame_loader
from pipeline.ensemble import blend_by_model
from pipeline.errors import UserError
from pipeline.folds import make_folds
from pipeline.gpu_loader import DeviceLoader, resolve_decode
from pipeline.model import MelanomaModel
from pipeline.predict import amp_dtype, default_device, predict_logits
from pipeline.provenance import git_commit
from pipeline.synthetic import generate_synthetic
from pipeline.train import build_trainer, resolve_precision
from pipeline.tta import VIEWS

log = logging.getLogger(__name__)


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
    data = replace(cfg.data, image_size=b.image_size or b.crop_size, crop_size=b.crop_size,
                   batch_size=b.batch_size, num_workers=b.num_workers)
    model = replace(cfg.model, backbone=b.backbone, pretrained=False, weights_path=None)
    return replace(cfg, data=data, model=model)


def bench_loader(cfg: Config, paths: np.ndarray, device: torch.device, decode: str, train: bool,
                 batch_size: int | None = None):
    """The pipeline's own loader (`frame_loader`) over the bench images by one data path:
    training crops and augmentations (shuffled), or the evaluation resize."""
    frame = pd.DataFrame({"image_path": paths, "target": (np.arange(len(paths)) % 5 == 0).astype(float)})
    return frame_loader(frame, replace(cfg.data, decode=decode), device, batch_size or cfg.data.batch_size,
                        cfg.train.aug if train else None, seed=0, shuffle=train)


def stop_prefetch(loader) -> None:
    """End a GPU-path loader's prefetch thread after a pass left early, so the next figure does
    not share the device with it."""
    if isinstance(loader, DeviceLoader):
        loader.close()


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


def lightning_rate(cfg: Config, paths: np.ndarray, device: torch.device, decode: str) -> dict:
    """Images/s of the fold trainer (checkpointing, loggers, progress bar and all), and the
    machine's cores busy over the whole fit (set-up and the loader workers' start included)."""
    b = cfg.bench
    run = replace(cfg, train=replace(cfg.train, epochs=1, limit_train_batches=b.train_steps,
                                     limit_val_batches=0))
    timer = StepTimer(b.warmup_steps, b.train_steps)
    trainer = build_trainer(run, Path(b.work_dir) / "lightning", [timer])
    model = MelanomaModel.from_configs(run.model, run.train)
    with busy_cores() as cores:
        trainer.fit(model, train_dataloaders=bench_loader(run, paths, device, decode, train=True))
    return {"img_s": (b.train_steps - b.warmup_steps) * b.batch_size / timer.seconds, **cores}


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


def plain_rate(cfg: Config, paths: np.ndarray, device: torch.device, decode: str) -> dict:
    """Images/s of the plain loop on the same loader and batches as the fold trainer, and the
    share of the timed steps the loop sat waiting for the next batch."""
    b = cfg.bench
    loop = PlainLoop(cfg, device, b.train_steps)
    loader = bench_loader(cfg, paths, device, decode, train=True)
    batches = WaitTimer(loader)
    start, waited = 0.0, 0.0
    for i, batch in enumerate(batches):
        if i == b.warmup_steps:
            sync(device)
            start, waited = time.perf_counter(), batches.waited
        loop.step(batch)
        if i == b.train_steps - 1:
            break
    sync(device)
    seconds = time.perf_counter() - start
    stop_prefetch(loader)
    return {"img_s": (b.train_steps - b.warmup_steps) * b.batch_size / seconds,
            "loader_wait_share": (batches.waited - waited) / seconds}


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


def cv2_rate(paths: np.ndarray) -> float:
    """Plain cv2 decoding of the files in one process: the reference for the loaders."""
    with stopwatch(torch.device("cpu")) as t:
        for p in paths:
            cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return len(paths) / t[0]


def data_path(cfg: Config, paths: np.ndarray, device: torch.device, decode: str) -> dict:
    """The data path alone (no model) over one epoch of training batches: images/s through the
    loader, its busy cores and (GPU path) the device memory it takes and whether that grows."""
    return data_path_memory(bench_loader(cfg, paths, device, decode, train=True), device)


def forward_rates(cfg: Config, model: MelanomaModel, device: torch.device) -> dict:
    """The forward rate of each TTA view on uint8 batches already on the device."""
    b, batch = cfg.bench, cfg.infer.batch_size
    images = torch.randint(0, 255, (batch, b.crop_size, b.crop_size, 3), dtype=torch.uint8).to(device)
    dtype = amp_dtype(device)
    rates = {}
    for name, view in VIEWS.items():
        @torch.inference_mode()
        def forward(view=view) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(view.forward(model.normalize(images)))
        rates[f"forward_{name}"] = batch / per_call(forward, 2, 5, device)
    return rates


def eval_model(cfg: Config, device: torch.device) -> MelanomaModel:
    model = MelanomaModel.from_configs(cfg.model, cfg.train).to(device).eval()
    if device.type == "cuda":
        model.net.to(memory_format=torch.channels_last)
    return model


def tta_rates(cfg: Config, paths: np.ndarray, device: torch.device, decode: str,
              model: MelanomaModel, forward: float) -> dict:
    """TTA images/s end to end (1 view, 8 views) through one data path, and the share of the
    time spent waiting for the loader."""
    loader = bench_loader(cfg, paths, device, decode, train=False, batch_size=cfg.infer.batch_size)
    predict_logits([model], loader, ["identity"], device, desc="warm-up")  # workers persist
    rates = {}
    for label, views in (("tta_1view", ["identity"]), ("tta_8views", list(VIEWS))):
        batches = WaitTimer(loader)
        with stopwatch(device) as t:
            predict_logits([model], batches, views, device, desc=label)
        rates[label] = len(paths) / t[0]
        rates[f"{label}_loader_wait_share"] = batches.waited / t[0]
    rates["tta_8views_vs_forward_over_8"] = rates["tta_8views"] / (forward / 8)
    return rates


def profiles(cfg: Config, paths: np.ndarray, device: torch.device, decode: str,
             model: MelanomaModel) -> dict:
    """torch.profiler tables (in bench.work_dir) of an 8-view TTA pass and of the plain loop's
    training steps through one data path: where each spends its time."""
    b = cfg.bench
    folder = Path(b.work_dir)
    loader = bench_loader(cfg, paths, device, decode, train=False, batch_size=cfg.infer.batch_size)
    predict_logits([model], loader, ["identity"], device, desc="warm-up")
    out = {"tta8": profile_table(lambda: predict_logits([model], loader, list(VIEWS), device, desc="profile"),
                                 device, folder / f"profile_tta8_{decode}.txt")}
    loop = PlainLoop(cfg, device, b.train_steps)
    loader = bench_loader(cfg, paths, device, decode, train=True)

    def steps() -> None:
        for i, batch in enumerate(loader):
            loop.step(batch)
            if i == b.train_steps - 1:
                break
        stop_prefetch(loader)

    out["train"] = profile_table(steps, device, folder / f"profile_train_{decode}.txt")
    return out


def path_figures(cfg: Config, paths: np.ndarray, device: torch.device, decode: str,
                 model_bound: float, model: MelanomaModel, forward: float) -> dict:
    """Every figure of one data path (cpu | gpu), Lightning and the plain loop alternated."""
    b = cfg.bench
    light, plain = [], []
    for _ in range(b.repeats):  # alternated, so drift in machine speed hits both alike
        light.append(lightning_rate(cfg, paths, device, decode))
        plain.append(plain_rate(cfg, paths, device, decode))
    best_light = max(light, key=lambda r: r["img_s"])
    best_plain = max(plain, key=lambda r: r["img_s"])
    out = {
        "train_lightning_img_s": best_light["img_s"], "train_plain_img_s": best_plain["img_s"],
        "train_lightning_runs": [r["img_s"] for r in light], "train_plain_runs": [r["img_s"] for r in plain],
        "train_busy_cores": best_light.get("busy_cores"),
        "train_plain_loader_wait_share": best_plain["loader_wait_share"],
    }
    out["lightning_vs_plain"] = out["train_lightning_img_s"] / out["train_plain_img_s"]
    out["end_to_end_vs_model_bound"] = out["train_lightning_img_s"] / model_bound
    out["data_path"] = data_path(cfg, paths, device, decode)
    out.update(tta_rates(cfg, paths, device, decode, model, forward))
    return out


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
    for decode in b.paths:
        resolve_decode(decode, device)  # an unknown path name fails before minutes of measuring
    paths = bench_images(cfg)
    pl.seed_everything(0, verbose=False)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "git_commit": git_commit(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "precision": resolve_precision(cfg.train.precision), "bench": asdict(b),
        "model_bound_img_s": model_bound_rate(cfg, device),
        "cv2_decode_1proc_img_s": cv2_rate(paths[: b.batch_size * b.train_steps]),
    }
    model = eval_model(cfg, device)
    result.update(forward_rates(cfg, model, device))
    result["forward"] = result["forward_identity"]
    result["paths"] = {decode: path_figures(cfg, paths, device, decode, result["model_bound_img_s"],
                                            model, result["forward"]) for decode in b.paths}
    result["ensemble_50x11k_s"] = ensemble_seconds(cfg)
    result["folds_60k_s"] = folds_seconds(cfg)
    out = Path(b.work_dir) / "bench.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if b.profile:  # last, the figures already written: profiling is slow and adds its own overhead
        result["profiles"] = {decode: profiles(cfg, paths, device, decode, model) for decode in b.paths}
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("benchmark (%s, %s, %s %dpx from %dpx JPEGs, batch %d, %d workers):\n%s\nwritten to %s",
             result["device"], result["precision"], b.backbone, b.crop_size, b.jpeg_size,
             b.batch_size, b.num_workers, format_result(result), out)
    return result


def format_result(r: dict) -> str:
    lines = [f"train  model-bound (uint8 on device)  {r['model_bound_img_s']:9.1f} img/s",
             f"data   cv2 decode, 1 process          {r['cv2_decode_1proc_img_s']:9.1f} img/s"]
    for k in [k for k in r if k.startswith("forward_")]:
        lines.append(f"infer  {k:<30}  {r[k]:9.1f} img/s")
    for decode, p in r["paths"].items():
        d = p["data_path"]
        memory = (f", peak {d['peak_mib']:.0f} MiB, growth {d['growth_mib']:+.1f} MiB"
                  if "peak_mib" in d else "")
        cores = p["train_busy_cores"]
        lines += [
            f"[{decode} path]",
            f"train  Lightning fold trainer      {p['train_lightning_img_s']:9.1f} img/s   "
            f"end-to-end / model-bound {p['end_to_end_vs_model_bound']:.3f}"
            + (f", {cores:.1f} cores busy" if cores is not None else ""),
            f"train  plain PyTorch AMP loop      {p['train_plain_img_s']:9.1f} img/s   "
            f"Lightning / plain {p['lightning_vs_plain']:.3f}; loader wait "
            f"{p['train_plain_loader_wait_share']:.0%} of the plain loop",
            f"data   loader alone (train batches) {d['img_s']:9.1f} img/s{memory}",
            f"infer  TTA 1 view end to end       {p['tta_1view']:9.1f} img/s",
            f"infer  TTA 8 views end to end      {p['tta_8views']:9.1f} img/s   "
            f"vs forward/8 {p['tta_8views_vs_forward_over_8']:.3f}; loader wait "
            f"{p['tta_8views_loader_wait_share']:.0%}",
        ]
        for name, prof in r.get("profiles", {}).get(decode, {}).items():
            lines.append(f"prof   {name}: wall {prof['wall_s']:.2f} s, device kernels "
                         f"{prof['device_kernel_s']:.2f} s -> {prof['table']}")
    lines += [
        f"ens    50 files x 11k rows (rank)  {r['ensemble_50x11k_s']:9.3f} s",
        f"folds  60k rows                    {r['folds_60k_s']:9.3f} s",
    ]
    return "\n".join(lines)
