"""What the benchmark measures besides images/s: busy CPU cores, time spent waiting on the
loader, GPU memory of the data path, and profiler tables of where a pass spends its time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType


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


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


@contextmanager
def busy_cores() -> Iterator[dict]:
    """How many of the machine's cores were busy, on average, during the block (all processes:
    the loader workers, the main process and its threads). {} where /proc/stat is absent."""
    out: dict = {}
    start = _cpu_jiffies()
    yield out
    end = _cpu_jiffies()
    if start and end and end[1] > start[1]:
        out["busy_cores"] = (end[0] - start[0]) / (end[1] - start[1]) * (os.cpu_count() or 1)


class WaitTimer:
    """Iterates `batches`, adding up the seconds spent blocked on the next batch (`waited`)."""

    def __init__(self, batches: Iterable):
        self.batches, self.waited = batches, 0.0

    def __iter__(self) -> Iterator:
        it = iter(self.batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - start
            yield batch


def data_path_memory(batches: Iterable[dict], device: torch.device) -> dict:
    """Images/s of the data path alone over one pass of `batches`, and on CUDA the memory it
    holds: the peak above what was allocated before, and the growth from the second batch to the
    last (a leak would grow with every batch)."""
    out: dict = {}
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        free0 = torch.cuda.mem_get_info(device)[0]
    count, start, after_first = 0, time.perf_counter(), None
    with busy_cores() as cores:
        for i, batch in enumerate(batches):
            count += len(batch["image"])
            if i == 0:
                sync(device)
                start, count = time.perf_counter(), 0
            if i == 1 and cuda:
                after_first = torch.cuda.memory_allocated(device)
            del batch
        sync(device)
    out["img_s"] = count / max(time.perf_counter() - start, 1e-9)
    out.update(cores)
    if cuda:
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["growth_mib"] = (torch.cuda.memory_allocated(device) - (after_first or base)) / 2**20
        out["device_used_mib"] = (free0 - torch.cuda.mem_get_info(device)[0]) / 2**20
    return out


def profile_table(fn: Callable[[], object], device: torch.device, path: Path, rows: int = 30) -> dict:
    """Run `fn` under torch.profiler; write the top ops (by self device time on CUDA, self CPU
    time elsewhere) to `path`; return the wall time and the device's summed kernel time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with stopwatch(device) as wall, torch.profiler.profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(events.table(sort_by=key, row_limit=rows) + "\n"
                    + events.table(sort_by="cpu_time_total", row_limit=rows))
    # kernels are events of the device's own type (ops on the CPU hold their launches, not their time)
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
    return {"wall_s": wall[0], "device_kernel_s": kernel_us / 1e6, "table": str(path)}
