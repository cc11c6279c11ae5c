"""The GPU data path: loader workers read JPEG bytes; batches are decoded and augmented on the device.

`DeviceTransform` turns a batch of bytes into the uint8 (B, H, W, C) batch the CPU path's loader
would give (decode, reduced-scale, resize, crop, augment), on the model's device. `DeviceLoader`
is a DataLoader that does this one batch ahead in a background thread on its own CUDA stream, so
decoding and augmenting overlap the model's step; Lightning, the plain loop and inference take
its batches like any loader's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline.config import AugConfig, DataConfig
from pipeline.errors import UserError
from pipeline.gpu_augment import augment, center_crop, random_crop, to_uint8_hwc
from pipeline.gpu_decode import decode_jpegs, resize_to

DECODE_MODES = ("cpu", "gpu", "auto")


def resolve_decode(mode: str, device: torch.device | str) -> str:
    """`data.decode` for a run on `device`: auto is gpu on CUDA, cpu elsewhere."""
    if mode not in DECODE_MODES:
        raise UserError(f"data.decode must be one of {list(DECODE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "gpu" if torch.device(device).type == "cuda" else "cpu"
    return mode


class DeviceTransform:
    """Bytes batch (`jpeg`, `path` and the row fields) -> the same batch with a uint8 `image` on
    `device`; rows whose image was skipped (`skip_bad`) are dropped and counted in `n_skipped`.

    `aug` None: the evaluation geometry (`data.eval_resize`); otherwise the training one (resize
    to image_size, random crop) and the augmentations, drawn from a generator seeded by `seed`.
    """

    def __init__(self, data: DataConfig, device: torch.device | str, aug: AugConfig | None = None,
                 seed: int = 0, min_side: int | None = None):
        self.data, self.aug, self.device = data, aug, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())  # set_device needs one
        self.min_side = min_side
        self.gen = torch.Generator().manual_seed(seed)

    def images(self, x: Tensor) -> Tensor:
        """Float (B, 3, h, w) batch resized to image_size or crop_size, then cropped, augmented."""
        d = self.data
        if self.aug is not None:
            return augment(random_crop(x, d.crop_size, self.gen), self.aug, self.gen)
        if d.eval_resize == "center_crop":
            return center_crop(x, d.crop_size)
        return x

    def size(self) -> int:
        d = self.data
        return d.crop_size if self.aug is None and d.eval_resize == "full" else d.image_size

    def __call__(self, batch: dict) -> dict:
        if "jpeg" not in batch:  # every file of the batch was unreadable and skipped in the loader
            batch["image"] = batch["image"].to(self.device)
            return batch
        jpegs, paths = batch.pop("jpeg"), batch.pop("path")
        decoded = decode_jpegs(jpegs, paths, self.device, self.min_side, self.data.skip_bad_images)
        keep = [i for i, im in enumerate(decoded) if im is not None]
        batch["n_skipped"] = batch.get("n_skipped", 0) + len(decoded) - len(keep)
        if len(keep) < len(decoded):
            rows = torch.tensor(keep, dtype=torch.long)
            batch = {k: v[rows] if torch.is_tensor(v) and v.ndim and len(v) == len(decoded) else v
                     for k, v in batch.items()}
        if not keep:
            batch["image"] = torch.empty(0, dtype=torch.uint8, device=self.device)
            return batch
        size = self.size()
        x = resize_to([decoded[i] for i in keep], size, size)
        batch["image"] = to_uint8_hwc(self.images(x))
        return batch


class _Prefetcher:
    """Runs the transform one or more batches ahead in a thread, on a side CUDA stream."""

    _END = object()

    def __init__(self, batches: Iterator[dict], transform: DeviceTransform, depth: int):
        self.batches, self.transform = batches, transform
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(transform.device)
        self.thread = threading.Thread(target=self._run, daemon=True, name="gpu-decode")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        torch.cuda.set_device(self.transform.device)
        try:
            with torch.cuda.stream(self.stream):
                for batch in self.batches:
                    out = self.transform(batch)
                    ready = torch.cuda.Event()
                    ready.record(self.stream)
                    if self.stop.is_set() or not self._put((out, ready)):
                        return
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
            return
        self._put(self._END)

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> dict:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, ready = item
        stream = torch.cuda.current_stream(self.transform.device)
        stream.wait_event(ready)
        for value in batch.values():  # made on the side stream, used on this one
            if torch.is_tensor(value) and value.is_cuda:
                value.record_stream(stream)
        return batch

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self.thread.join()


class DeviceLoader(DataLoader):
    """A DataLoader over a bytes dataset whose batches come out decoded and augmented by
    `device_transform` on its device (in a prefetch thread on CUDA, inline on the CPU)."""

    def __init__(self, *args, device_transform: DeviceTransform, prefetch: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_transform = device_transform
        self.prefetch = prefetch
        self._running: _Prefetcher | None = None

    def __iter__(self) -> Iterator[dict]:
        if self._running is not None:  # a pass left early (a batch limit): stop its thread first
            self._running.close()
            self._running = None
        batches = super().__iter__()
        if self.device_transform.device.type != "cuda":
            return map(self.device_transform, batches)
        self._running = _Prefetcher(batches, self.device_transform, self.prefetch)
        return self._running
