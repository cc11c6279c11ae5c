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
import weakref
from collections.abc import Iterator
from contextlib import nullcontext

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
    to image_size, random crop) and the augmentations, drawn from a generator seeded by `seed`
    and the process's DDP rank (the CPU path's workers get the rank from Lightning's worker seed).
    """

    def __init__(self, data: DataConfig, device: torch.device | str, aug: AugConfig | None = None,
                 seed: int = 0, min_side: int | None = None):
        self.data, self.aug, self.device = data, aug, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())  # set_device needs one
        self.min_side = min_side
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.gen = torch.Generator().manual_seed(seed + 1_000_003 * rank)

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
        decoded = decode_jpegs(jpegs, paths, self.device, skip_bad=self.data.skip_bad_images)
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
        x = resize_to([decoded[i] for i in keep], size, size, self.min_side)
        batch["image"] = to_uint8_hwc(self.images(x))
        return batch


_END = object()


def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
    """Queue `item` unless told to stop first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _prefetch(batches: Iterator[dict], transform: DeviceTransform, out: queue.Queue,
              stop: threading.Event, stream: torch.cuda.Stream | None) -> None:
    """The prefetch thread: transform each batch on `stream`, queue it with its ready event.
    It holds no reference to the consumer, so a consumer dropped early is collected and stops it."""
    try:
        if stream is not None:
            torch.cuda.set_device(transform.device)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for batch in batches:
                if stop.is_set():
                    return
                batch = transform(batch)
                ready = None
                if stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(stream)
                if not _put(out, stop, (batch, ready)):
                    return
    except BaseException as err:  # handed to the consumer, raised there
        _put(out, stop, err)
        return
    _put(out, stop, _END)


class _Prefetcher:
    """Batches transformed one or more ahead in a thread on a side CUDA stream; the consumer's
    stream waits for each batch's event, and the batch's memory is marked as used there.
    (On the CPU the same thread without streams: how the tests check it.)"""

    def __init__(self, batches: Iterator[dict], transform: DeviceTransform, depth: int):
        self.device = transform.device
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.done = False
        self.thread = threading.Thread(
            target=_prefetch, daemon=True, name="gpu-decode",
            args=(batches, transform, self.queue, self.stop,
                  torch.cuda.Stream(self.device) if self.device.type == "cuda" else None))
        self.thread.start()
        weakref.finalize(self, self.stop.set)

    def __iter__(self) -> _Prefetcher:
        return self

    def _get(self):
        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the GPU decode thread ended without a batch or an error") from None

    def __next__(self) -> dict:
        if self.done:
            raise StopIteration
        item = self._get()
        if item is _END or isinstance(item, BaseException):
            self.done = True
            if item is _END:
                raise StopIteration
            raise item
        batch, ready = item
        if ready is None:
            return batch
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        for value in batch.values():  # made on the side stream, used on this one
            if torch.is_tensor(value) and value.is_cuda:
                value.record_stream(stream)
        return batch


class DeviceLoader(DataLoader):
    """A DataLoader over a bytes dataset whose batches come out decoded and augmented by
    `device_transform` on its device (in a prefetch thread on CUDA, inline on the CPU)."""

    def __init__(self, *args, device_transform: DeviceTransform, prefetch: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_transform = device_transform
        self.prefetch = prefetch
        self._thread: tuple[threading.Event, threading.Thread] | None = None

    def close(self) -> None:
        """Stop the prefetch thread of a pass left early (a batch limit, a `break`)."""
        if self._thread is not None:
            stop, thread = self._thread
            stop.set()
            thread.join()
            self._thread = None

    def __iter__(self) -> Iterator[dict]:
        self.close()  # the workers' iterator is reused (persistent workers): one reader at a time
        batches = super().__iter__()
        if self.device_transform.device.type != "cuda":
            return map(self.device_transform, batches)
        running = _Prefetcher(batches, self.device_transform, self.prefetch)
        self._thread = (running.stop, running.thread)
        return running
