"""Retention gates (TrimKV / DBTrimKV, Bui et al., arXiv 2512.03324 and 2605.09649): a small MLP per layer
predicts, for every cached (KV head, token), how slowly the token should be forgotten, ``log β ≤ 0``.

``z = W3 · act(W2 · act(W1 x + b1) + b2)[h] + b[h]``, ``log β = logsigmoid(z)``; ``W1, W2`` are per layer,
the final projection ``W3, b`` is **one module shared by every layer** (DBTrimKV's tied readout), so that
scores of all layers and heads sit on one scale and can compete for one global budget.

The gate reads the cached token itself, ``x = rmsnorm([k_h, v_h])`` (the post-RoPE key and the value of
KV head ``h``), not the layer's hidden state as the papers do (TrimKV's ``rg2``/``rg3`` variants also read
keys and values). Everything a gate needs is then in the cache: any later compression (decode triggers,
chunked prefill, a quantized layer) recomputes ``log β`` from the slots it holds, with no per-token
metadata to store and compact. Gate files are safetensors with a metadata record; never pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kvpipe.errors import KVPipeError

SHIPPED = {name: Path(__file__).parent / "gates_data" / f"{name}.safetensors"
           for name in ("smollm2-135m", "smollm2-135m-reconstruction")}   # KL-trained; distilled


class RetentionGates(nn.Module):
    """Gates for a model with ``layers`` layers of ``heads`` KV heads of size ``head_dim``.

    ``shared=False`` gives every layer its own final projection (the ablation of the tied readout).
    """

    def __init__(self, layers: int, heads: int, head_dim: int, hidden: int = 64, bias_init: float = 10.0,
                 shared: bool = True):
        super().__init__()
        self.layers, self.heads, self.head_dim, self.hidden, self.shared = layers, heads, head_dim, hidden, shared
        self.inner = nn.ModuleList(nn.Sequential(nn.Linear(2 * head_dim, hidden), nn.SiLU(),
                                                 nn.Linear(hidden, hidden), nn.SiLU()) for _ in range(layers))
        # shared: one readout module serves every layer (one parameter set, gradients from all layers)
        self.readouts = nn.ModuleList(_Readout(heads, hidden, bias_init) for _ in range(1 if shared else layers))
        for linear in self.inner.modules():               # each layer's two Linear, in order
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)

    def forward(self, layer: int, keys: torch.Tensor, values: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """``keys``/``values [B, Hkv, n, D]`` of one layer -> ``log β [B, Hkv, n]`` (fp32, ≤ 0). ``heads``: which of
        the model's KV heads these are (a rank's share under tensor parallelism; default all)."""
        x = torch.cat([keys, values], -1).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        # the gates follow their layer's device (a few KiB; layers may sit on several devices)
        inner, readout = self.inner[layer].to(x.device), self.readout(layer).to(x.device)
        return nn.functional.logsigmoid(readout(inner(x), heads))

    @staticmethod
    def parameter_shapes(layers: int, heads: int, head_dim: int, hidden: int, shared: bool = True
                         ) -> dict[str, tuple[int, ...]]:
        """The name and shape of every parameter of such gates, without building them (a gate file is checked
        against this before anything is allocated)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(layers):
            shapes |= {f"inner.{layer}.0.weight": (hidden, 2 * head_dim), f"inner.{layer}.0.bias": (hidden,),
                       f"inner.{layer}.2.weight": (hidden, hidden), f"inner.{layer}.2.bias": (hidden,)}
        for readout in range(1 if shared else layers):
            shapes |= {f"readouts.{readout}.weight": (heads, hidden), f"readouts.{readout}.bias": (heads,)}
        return shapes

    def readout(self, layer: int) -> nn.Module:
        return self.readouts[0 if self.shared else layer]

    def check_shape(self, layers: int, heads: int, head_dim: int, source: str) -> None:
        if (layers, heads, head_dim) != (self.layers, self.heads, self.head_dim):
            raise KVPipeError(f"retention gates {source} were trained for {self.layers} layers x {self.heads} KV "
                              f"heads x head_dim {self.head_dim}, but this model has {layers} x {heads} x "
                              f"{head_dim}; train gates for it with `kvpipe train-gates`")

    # --- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path, record: dict) -> None:
        """Weights as safetensors (fp32), ``record`` (model, budget, steps, data, losses...) as metadata."""
        shape = {"layers": self.layers, "heads": self.heads, "head_dim": self.head_dim, "hidden": self.hidden,
                 "shared": self.shared}
        tensors = {name: p.detach().float().contiguous() for name, p in self.named_parameters()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"shape": json.dumps(shape), "record": json.dumps(record)})

    @classmethod
    def load(cls, source: str | Path) -> tuple[RetentionGates, dict]:
        """``(gates, record)`` from a shipped name (``smollm2-135m``) or a ``.safetensors`` path, checked before
        anything is built (``core.gate_file``)."""
        from kvpipe.core.gate_file import read_gate_file

        path = SHIPPED.get(str(source), Path(source))
        if not path.is_file():
            raise KVPipeError(f"no retention gate file {source!r}: give a .safetensors path or one of "
                              f"{sorted(SHIPPED)}")
        shape, record, tensors = read_gate_file(path, cls.parameter_shapes)
        gates = cls(**shape.model_dump())
        gates.load_state_dict(tensors)
        return gates.eval().requires_grad_(False), record.model_dump()


class _Readout(nn.Module):
    """The final projection: row ``h`` of ``weight`` (and ``bias[h]``) reads out KV head ``h``."""

    def __init__(self, heads: int, hidden: int, bias_init: float):
        super().__init__()
        # built on the host like any nn.Module; forward() moves the gates to their layer's device
        self.weight = nn.Parameter(torch.randn(heads, hidden, device="cpu") * 0.02)
        self.bias = nn.Parameter(torch.full((heads,), bias_init, device="cpu"))

    def forward(self, u: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """``u [B, Hkv, n, hidden]`` of the KV heads ``heads`` -> ``z [B, Hkv, n]``."""
        return torch.einsum("bhni,hi->bhn", u, self.weight[heads]) + self.bias[heads, None]


def retention_scores(log_beta: torch.Tensor, positions: torch.Tensor, next_position: torch.Tensor,
                     lookahead: int = 1) -> torch.Tensor:
    """TrimKV's geometric retention score, higher = keep: ``(t − pos)·log β``, or with ``lookahead`` n > 1
    the log of the retained mass over the next n steps, ``a·log β + log(1 − βⁿ) − log(1 − β)``, a = t + 1 − pos.

    ``log_beta``/``positions [B, Hkv, n]``, ``next_position long [B]`` (t = the next token's position).
    """
    age = (next_position[:, None, None] - positions).float()
    if lookahead == 1:
        return age * log_beta
    log_beta = log_beta.clamp(max=-1e-7)                     # β < 1 strictly, so log(1 - β) is finite
    return (age + 1) * log_beta + _log1mexp(lookahead * log_beta) - _log1mexp(log_beta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x < 0, stable at both ends."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
