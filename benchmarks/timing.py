"""Timing shared by the benchmark scripts: medians with device events on CUDA, and the copy-bandwidth ceiling."""
from __future__ import annotations

import statistics
import time

import torch


def timer(device: torch.device):
    """``time(fn) -> seconds`` (median): ``triton.testing.do_bench`` on CUDA (L2 flushed between runs, CUDA
    events), repeated ``perf_counter`` on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def cpu(fn, reps: int = 7) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return cpu


def copy_bandwidth(device: torch.device, time_it, numel: int = 2 ** 28) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (1 GiB buffers)."""
    src = torch.randn(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / time_it(lambda: dst.copy_(src))
