"""Block sizes for the Triton kernels: ``triton.autotune`` on a GPU, one fixed configuration in the interpreter.

Triton's CPU interpreter has no driver, so ``@triton.autotune`` cannot run there; the first
configuration of the list is then the one used. ``launcher(kernel)`` launches either way: under the interpreter
with the fixed configuration; compiled, it tunes on the first call of each key, then goes straight to the
compiled kernel with the configuration chosen, skipping the autotuner's per-call bookkeeping (a decode step
launches the kernel once per layer, so host time per call is decode time).
"""
from __future__ import annotations

from typing import Callable, Hashable

import triton

from kvpipe.kernels.interpreter import interpreting


def autotuned(configs: list[triton.Config], key: list[str]):
    """``@triton.autotune(configs, key)`` when compiling; under the interpreter the kernel as is, remembering
    the first configuration for ``launcher``."""
    def decorate(kernel):
        if interpreting():
            kernel.kvpipe_fixed = dict(configs[0].kwargs)
            return kernel
        return triton.autotune(configs=configs, key=key)(kernel)
    return decorate


def launcher(kernel) -> Callable[..., None]:
    """``launch(grid, key, *args, **meta)`` for an ``autotuned`` kernel. ``key`` must determine the autotuner's
    own key (the values of its ``key`` arguments and the tensors' dtypes): the configuration tuned for the first
    call with ``key`` is reused for every later one."""
    if interpreting():
        return lambda grid, key, *args, **meta: kernel[grid](*args, **meta, **kernel.kvpipe_fixed)
    chosen: dict[Hashable, dict] = {}

    def launch(grid, key, *args, **meta):
        config = chosen.get(key)
        if config is None:
            kernel[grid](*args, **meta)
            chosen[key] = kernel.best_config.all_kwargs()
        else:
            kernel.fn[grid](*args, **meta, **config)
    return launch
