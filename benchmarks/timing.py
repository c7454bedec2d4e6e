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


def back_to_back(device: torch.device, fn, calls: int = 100) -> float:
    """Seconds per call of ``calls`` calls issued back to back, as a decode loop issues them: the larger of the
    host's cost to launch a call and the device's cost to run it (no L2 flush between calls)."""
    fn()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - started) / calls


def graph_replay(device: torch.device, fn, calls: int = 20, replays: int = 10) -> float | None:
    """Device seconds per call, host launch costs removed: ``calls`` calls captured in one CUDA graph, replayed
    (median of ``replays``). ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):                  # warm up off the capture (compiles, autotuning, allocator)
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)
