"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): the current query's attention decides."""
from __future__ import annotations

import torch

from kvpipe.core.context import Observation
from kvpipe.core.registry import register
from kvpipe.core.stage_bases import ObservingScorer


@register("tova", family="scoring")
class TOVA(ObservingScorer):
    """Score = attention of the last real query, averaged over all query heads of the layer.

    Every KV head of a layer gets the same scores (TOVA makes one decision per layer). Probabilities,
    so comparable across heads and layers.
    """


    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``."""
        q = obs.query.shape[2]
        # float64 sums, so a layer whose heads are split over ranks gets the same mean
        heads = obs.query.shape[1] * obs.shards.world
        last = (obs.shards.sum(obs.attention_probs(q - 1, q)[:, :, 0].double().sum(1)) / heads).float()  # [B, kv]
        return last[:, None].expand(-1, obs.key.shape[1], -1).contiguous()
