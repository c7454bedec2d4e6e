"""Which kernels run: ``backend: auto | torch | triton`` in the spec, resolved once per attach.

``auto`` is Triton on a CUDA model and torch elsewhere. ``triton`` is refused where it cannot run (no triton,
or a CPU model without ``TRITON_INTERPRET=1``) instead of quietly running something else.
"""
from __future__ import annotations

import importlib.util

import torch

from kvpipe.errors import UnsupportedModelError
from kvpipe.kernels.interpreter import interpreting
from kvpipe.kernels.ragged import pack_ragged


def resolve_backend(requested: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for a model on ``device``."""
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    if importlib.util.find_spec("triton") is None:
        raise UnsupportedModelError(f"backend: {requested} on {device} needs Triton: pip install 'kvpipe[triton]' "
                                    "(or set backend: torch in the pipeline)")
    if device.type != "cuda" and not interpreting():
        raise UnsupportedModelError(f"backend: triton needs a CUDA model, this one is on {device}; set backend: torch "
                                    "or auto (TRITON_INTERPRET=1 runs the kernels on CPU, slowly, for testing)")
    return "triton"


def packer(backend: str):
    """The compaction kernel of ``backend``: ``(padded [B, H, L, *rest], keep [B, H, L]) -> [N, *rest]``."""
    if backend == "triton":
        from kvpipe.kernels.triton_compact import pack_ragged_triton
        return pack_ragged_triton
    return pack_ragged
