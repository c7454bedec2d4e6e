"""Key-norm prefilter: only the keys with the smallest norms stay eligible (after KNorm, Devoto et al., 2024)."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import CandidateStage
from kvpipe.kernels.topk import ranks


class KeyNormPrefilterParams(Params):
    fraction: float = Field(0.5, gt=0, le=1, description="share of each head's slots left eligible: those whose "
                                                          "keys have the smallest L2 norm")


@register("key_norm_prefilter", family="candidate selection")
class KeyNormPrefilter(CandidateStage[KeyNormPrefilterParams]):
    """Narrows what later stages may keep to the lowest-norm keys of each head; slots protected upstream stay
    protected and eligible. Cheap (no queries), so it prunes before an expensive scorer ranks the rest."""

    Params = KeyNormPrefilterParams

    def refine(self, ctx, view, upstream, observed):
        norms = view.keys.float().norm(dim=-1).masked_fill(~view.valid, float("inf"))
        allowed = torch.ceil(view.valid.sum(-1) * self.params.fraction).long()
        return upstream.narrowed(ranks(norms, descending=False) < allowed[..., None])
