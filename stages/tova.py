"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): the current query's attention decides."""
from __future__ import annotations

import torch

from kvpipe.context import CompressionContext, Observation
from kvpipe.registry import Stage, register


@register("tova", family="scoring")
class TOVA(Stage):
    """Score = attention of the last real query, averaged over all query heads of the layer.

    Every KV head of a layer gets the same scores (TOVA makes one decision per layer). Probabilities,
    so comparable across heads and layers.
    """

    writes = ("scores",)
    observes = True

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``."""
        q = obs.query.shape[2]
        last = obs.attention_probs(q - 1, q)[:, :, 0].mean(1)            # [B, kv]
        return last[:, None].expand(-1, obs.key.shape[1], -1).contiguous()

    def __call__(self, ctx: CompressionContext) -> None:
        ctx.write(self, "scores", ctx.observed(self))
