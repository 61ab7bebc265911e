"""Timing helpers shared by the benchmarks: warm-up, repeated timing, peak memory on CPU or CUDA."""
from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def device() -> torch.device:
    """CUDA when available, else CPU (benchmarks run wherever the user runs them)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_it(fn: Callable[[], object], dev: torch.device, *, warmup: int = 1, repeat: int = 3) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; seconds per call (median, min, all)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mib(dev: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU (MiB)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
