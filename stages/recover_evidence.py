"""Evidence recovery (the first step the fixed-contract diagnostic prescribes, arXiv 2605.08234):
make sure the tokens decoding will read are kept, before any ranking decides."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import CandidateStage
from kvpipe.kernels.topk import select_topk


class RecoverEvidenceParams(Params):
    window: int = Field(64, ge=1, description="decode-aligned queries: the last `window` real prompt queries")
    coverage: float = Field(0.9, gt=0, le=1, description="per query, recover the smallest set of tokens holding "
                                                         "this much of its attention mass")
    hops: Literal[1, 2] = Field(1, description="2 = also recover what the recovered tokens point to (their keys "
                                               "used as queries): multi-hop evidence")
    hop_tokens: int = Field(8, ge=1, description="with hops: 2, how many recovered tokens (by mass) query again")
    max_share: float = Field(0.5, gt=0, le=1, description="at most this share of each head's budget is protected "
                                                          "as recovered evidence (by attention mass)")


@register("recover_evidence", family="evidence recovery")
class RecoverEvidence(CandidateStage[RecoverEvidenceParams]):
    """Support recovery: per query of the observation window, the nucleus of its attention (smallest set with
    ``coverage`` of the mass), united over queries and over the query heads of a KV head; optionally a second
    hop from the keys of the strongest recovered tokens. Recovered tokens become protected candidates, the
    heaviest first, up to ``max_share`` of the head's budget, so the ranking and projection after it
    cannot drop them."""

    Params = RecoverEvidenceParams
    observes = True

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv, 2]``: (recovered 0/1, mean attention mass from the window)."""
        q = obs.query.shape[2]
        probs = obs.attention_probs(max(q - self.params.window, 0), q)                   # [B, Hq, w, kv]
        recovered = obs.to_kv_heads(nucleus(probs, self.params.coverage).any(2).float(), "max") > 0
        mass = obs.to_kv_heads(probs.mean(2), "mean")                                    # [B, Hkv, kv]
        if self.params.hops == 2:
            recovered |= self._second_hop(obs, recovered, mass)
        return torch.stack([recovered.float(), mass], -1)

    def _second_hop(self, obs: Observation, recovered: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Tokens the strongest recovered tokens' keys attend to (key-key attention), as a nucleus."""
        keys = obs.key.float()                                                           # [B, Hkv, kv, D]
        top = mass.masked_fill(~recovered, float("-inf")).topk(min(self.params.hop_tokens, keys.shape[2]), -1)
        pseudo = keys.gather(2, top.indices[..., None].expand(-1, -1, -1, keys.shape[-1]))   # [B, Hkv, r, D]
        logits = (pseudo @ keys.transpose(-1, -2)) * obs.scaling                         # [B, Hkv, r, kv]
        logits = logits.masked_fill(~obs.key_valid[:, :, None], float("-inf"))
        live = torch.isfinite(top.values)[..., None]                                     # fewer recovered than r
        return (nucleus(logits.softmax(-1).nan_to_num(0.0), self.params.coverage) & live).any(2)

    def refine(self, ctx, view, upstream, observed):
        cap = torch.floor(ctx.slots_per_head().double() * self.params.max_share).long()  # [B]
        recovered = (observed[..., 0] > 0) & view.valid & upstream.eligible & ~upstream.protected
        room = (cap[:, None] - upstream.protected.sum(-1)).clamp_min(0)
        return upstream.protecting(select_topk(observed[..., 1], room, recovered))  # chosen ⊆ eligible already

def nucleus(probs: torch.Tensor, coverage: float) -> torch.Tensor:
    """``bool``, same shape: per row (last dim), the smallest set of entries whose sum reaches ``coverage``."""
    ordered, order = probs.sort(-1, descending=True)
    before = ordered.cumsum(-1) - ordered                       # mass of the entries ranked above
    inside = (before < coverage) & (ordered > 0)
    return torch.zeros_like(inside).scatter(-1, order, inside)
