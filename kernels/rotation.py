"""Randomized Hadamard rotations: an orthogonal ``R [D, D]`` applied to keys and values before low-bit quantization.

``R = diag(s) · H_D / √D`` with ``H_D`` Sylvester's Hadamard matrix and ``s`` random signs drawn from a seed. A row
vector ``x`` is stored as ``x R``: an outlier channel's energy spreads evenly over all ``D`` channels (QuaRot,
SpinQuant, RotateKV), so per-group ranges shrink and low-bit codes lose less. ``R`` is orthogonal, so
``(q R)·(k R) = q·k`` and ``(p·V R) Rᵀ = p·V``: dequantized tokens are turned back with ``Rᵀ``.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def randomized_hadamard(dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``float32 [dim, dim]`` on ``device``, orthogonal; ``dim`` a power of two. Built on the host from the seed
    (the same matrix on every device) and kept per device: reads reuse it, no copy per step."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head dimension, got {dim}")
    hadamard = torch.ones(1, 1, device="cpu")
    while hadamard.shape[0] < dim:                 # Sylvester: H_2n = [[H, H], [H, -H]]
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (dim,), generator=generator, device="cpu").float() * 2 - 1
    return (signs[:, None] * hadamard / dim ** 0.5).to(device)
