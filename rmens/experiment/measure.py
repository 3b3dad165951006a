"""Wall time and peak memory of a block of work (one arm's training or scoring)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psutil  # a dependency of accelerate
import torch


@contextlib.contextmanager
def measure(interval_s: float = 0.05) -> Iterator[dict]:
    """Fills the yielded dict with `wall_s` and `peak_mib` when the block ends.

    On a GPU the peak is PyTorch's peak allocated device memory during the block (`memory: cuda`); on a
    CPU it is the process's peak resident memory, sampled every `interval_s` (`memory: rss`), which
    includes whatever the process held before the block (reported as `rss_before_mib`).
    """
    out: dict = {}
    cuda = torch.cuda.is_available()
    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True, name="rmens-rss")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        out["rss_before_mib"] = peak[0] / 2**20
        sampler.start()
    start = time.perf_counter()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
        out["wall_s"] = time.perf_counter() - start
        if cuda:
            out.update(peak_mib=torch.cuda.max_memory_allocated() / 2**20, memory="cuda")
        else:
            stop.set()
            sampler.join()
            out.update(peak_mib=max(peak[0], process.memory_info().rss) / 2**20, memory="rss")
