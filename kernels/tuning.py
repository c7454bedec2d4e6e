"""Block sizes for the Triton kernels: ``triton.autotune`` on a GPU, one fixed configuration in the interpreter.

Triton's CPU interpreter has no driver, so ``@triton.autotune`` cannot run there (kernels.md §4.3); the first
configuration of the list is then the one used. Launchers pass ``fixed(kernel)`` as extra meta-parameters:
empty on a GPU (the autotuner supplies them), the first configuration's values in the interpreter.
"""
from __future__ import annotations

import triton

from kvpipe.kernels.interpreter import interpreting


def autotuned(configs: list[triton.Config], key: list[str]):
    """``@triton.autotune(configs, key)`` when compiling; under the interpreter the kernel as is, remembering
    the first configuration for ``fixed``."""
    def decorate(kernel):
        if interpreting():
            kernel.kvpipe_fixed = dict(configs[0].kwargs)
            return kernel
        return triton.autotune(configs=configs, key=key)(kernel)
    return decorate


def fixed(kernel) -> dict:
    """The meta-parameters a launch must pass itself (interpreter only; ``{}`` when autotuned)."""
    return getattr(kernel, "kvpipe_fixed", {})
