"""Attention mass (H2O's heavy hitters, "importance"): how much attention each cached token received."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import ObservingScorer


def _odd(pool: int) -> int:
    if pool % 2 == 0:
        raise ValueError("pool must be odd so the window is centred on the token")
    return pool


PoolKernel = Annotated[int, AfterValidator(_odd)]


class AttentionMassParams(Params):
    window: int | None = Field(None, ge=1, description="score with the last `window` real queries only "
                                                        "(SnapKV's observation window); null = all queries (H2O)")
    normalize: bool = Field(True, description="divide by the number of queries that could see each token, "
                                              "so early tokens are not favoured just for being seen more")
    group: Literal["mean", "max"] = Field("mean", description="how the query heads of one KV head are combined")
    pool: PoolKernel = Field(1, ge=1, description="max-pool scores over this many neighbouring tokens (odd; "
                                                   "SnapKV uses 7) so multi-token facts are kept whole; 1 = none")


@register("attention_mass", family="scoring")
class AttentionMass(ObservingScorer[AttentionMassParams]):
    """Score = softmax attention a token receives from the prompt's queries, summed (or averaged) over them."""

    Params = AttentionMassParams

    def observe(self, obs: Observation) -> torch.Tensor:
        """Returns ``float32 [B, Hkv, kv]``."""
        mass = attention_mass(obs, self.params.window, self.params.normalize)
        return pool_neighbours(obs.to_kv_heads(mass, self.params.group), self.params.pool)


def attention_mass(obs: Observation, window: int | None, normalize: bool) -> torch.Tensor:
    """``float32 [B, Hq, kv]``: attention each key receives from the last ``window`` queries (all if None),
    optionally divided by how many of those queries could see it (causality, padding)."""
    batch, q_heads, q, _ = obs.query.shape
    kv = obs.key.shape[2]
    start = 0 if window is None else max(0, q - window)
    mass = torch.zeros(batch, q_heads, kv, device=obs.query.device)
    block = obs.query_block()
    for lo in range(start, q, block):
        mass += obs.attention_probs(lo, min(lo + block, q)).sum(2)
    if normalize:
        mass /= seen_by(obs.query_valid[:, start:], kv - q + start, kv).clamp(min=1)[:, None, :]
    return mass


def pool_neighbours(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over a centred window of ``kernel`` tokens: ``[B, H, n]`` -> ``[B, H, n]``."""
    if kernel == 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    return torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(scores.shape)


def seen_by(query_valid: torch.Tensor, first_position: int, kv: int) -> torch.Tensor:
    """``float [B, kv]``: how many valid queries (at positions ``first_position + i``) see each key causally."""
    per_position = torch.zeros(query_valid.shape[0], kv, device=query_valid.device)
    per_position[:, first_position:first_position + query_valid.shape[1]] = query_valid.float()
    return per_position.flip(-1).cumsum(-1).flip(-1)
