"""Fidelity to the full cache on real text: per-token KL divergence and perplexity of a continuation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvpipe.models import cache_arg


@dataclass(frozen=True)
class Fidelity:
    kl: float            # mean KL(full || compressed) over continuation tokens, nats
    ppl_full: float
    ppl: float

    @property
    def ppl_increase(self) -> float:
        return self.ppl / self.ppl_full - 1


def continuation_logits(model, context: torch.Tensor, continuation: torch.Tensor, cache) -> torch.Tensor:
    """Logits ``[n, vocab]`` predicting each continuation token, the context compressed (if attached) first."""
    with torch.inference_mode():
        last = model(context, **cache_arg(model, cache)).logits[0, -1:]
        rest = model(continuation[:, :-1], **cache_arg(model, cache)).logits[0]
    return torch.cat([last, rest]).float()


def fidelity(model, pipeline, context: torch.Tensor, continuation: torch.Tensor, tokenizer=None) -> Fidelity:
    """Teacher-forced comparison: both caches read the same ``continuation [1, n]`` after ``context [1, m]``."""
    full = continuation_logits(model, context, continuation, DynamicCache(config=model.config))
    with pipeline.attach(model, tokenizer) as handle:
        compressed = continuation_logits(model, context, continuation, handle.cache())
    return compare(full, compressed, continuation[0])


def compare(full: torch.Tensor, compressed: torch.Tensor, target: torch.Tensor) -> Fidelity:
    """KL and perplexities from logits ``[n, vocab]`` of both caches predicting ``target [n]``."""
    log_full, log_comp = full.log_softmax(-1), compressed.log_softmax(-1)
    kl = (log_full.exp() * (log_full - log_comp)).sum(-1).mean()
    nll = lambda logp: -logp.gather(-1, target[:, None]).mean()  # noqa: E731
    return Fidelity(float(kl), float(nll(log_full).exp()), float(nll(log_comp).exp()))
