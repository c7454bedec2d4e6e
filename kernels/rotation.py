"""Randomized Hadamard rotations: an orthogonal ``R [D, D]`` applied to keys and values before low-bit quantization.

``R = diag(s) · H_D / √D`` with ``H_D`` Sylvester's Hadamard matrix and ``s`` random signs drawn from a seed. A row
vector ``x`` is stored as ``x R``: an outlier channel's energy spreads evenly over all ``D`` channels (QuaRot,
SpinQuant, RotateKV), so per-group ranges shrink and low-bit codes lose less. ``R`` is orthogonal, so
``(q R)·(k R) = q·k`` and ``(p·V R) Rᵀ = p·V``: dequantized tokens are turned back with ``Rᵀ``.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def randomized_hadamard(dim: int, seed: int) -> torch.Tensor:
    """``float32 [dim, dim]``, orthogonal; ``dim`` a power of two (on the host: callers move it)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head dimension, got {dim}")
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < dim:                 # Sylvester: H_2n = [[H, H], [H, -H]]
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return signs[:, None] * hadamard / dim ** 0.5
