"""Peak memory of a piece of work: CUDA `max_memory_allocated`, or on CPU the largest resident set sampled
every millisecond, minus what was in use before it started."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(work: Callable[[], object], device: torch.device) -> int:
    """Bytes above the starting level at the peak of `work()`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = current_rss()
    sampled, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.wait(1e-3):
            sampled.append(current_rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        stop.set()
        sampler.join()
    return max(sampled) - before
