"""StreamingLLM's protected set: the first tokens (attention sinks) and the most recent window."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import CandidateStage


class SinksWindowParams(Params):
    sinks: int = Field(4, ge=0, description="first real tokens always kept (attention sinks)")
    window: int = Field(64, ge=0, description="most recent real tokens always kept")


@register("sinks_window", family="candidate selection")
class SinksWindow(CandidateStage[SinksWindowParams]):
    """Marks sinks and the recent window as protected: every eviction after it keeps them."""

    Params = SinksWindowParams

    def refine(self, ctx, view, upstream, observed):
        return upstream.protecting(protected_ends(view.valid, self.params.sinks, self.params.window))

    def check_budget(self, budget) -> str | None:
        protected = self.params.sinks + self.params.window
        if budget.kind == "tokens" and budget.tokens < protected:
            return (f"budget of {budget.tokens} tokens per head is below the {protected} that sinks_window protects "
                    f"({self.params.sinks} sinks + {self.params.window} window); raise the budget or shrink them")
        return None


def protected_ends(valid: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """``bool [B, H, n]``: the first ``sinks`` and last ``window`` valid slots of each head (padding skipped)."""
    rank = valid.long().cumsum(-1) - 1                     # index among valid slots
    count = valid.sum(-1, keepdim=True)
    return valid & ((rank < sinks) | (rank >= count - window))
