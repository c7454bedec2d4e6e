"""Retention gates distilled from reconstruction scores (KVzap's idea, Jegou & Jeblick 2026, on the seeds' gates).

The teacher is the ``reconstruction`` stage (KVzip): after a prefill, the model re-reads its context after a
repeat prompt, and a cached token's score is the most attention any re-reading query of its KV group gives it.
That costs a second pass over the context at every compression. A gate reads one cached key and value and
predicts the **log** of that score, so the fast path costs two small matrix products per token and no pass.

Loss: mean squared error between the gate's ``log β = logsigmoid(z)`` and ``log(score + ε)`` over every (layer,
KV head, token) of the sequence: both live in ``(−∞, 0]``, and since the teacher's scores are attention
probabilities on one scale in every layer, so are the gates' predictions (what ``global`` needs). No gradient
goes through the model: the teacher's scores and the cached keys and values are constants, which is why a step
costs about a prefill and a probe, not a backward pass through the model, and can use 1k-token sequences on CPU.

Training text: windows of Python-documentation prose with a few facts in a template of this module's own
(never the evaluation generators' "special magic number" sentences), so the gates learn to keep numbers.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, cast

import torch

from kvpipe.core.gates import RetentionGates
from kvpipe.core.plan import Plan, validated
from kvpipe.eval.tasks import paragraphs
from kvpipe.runtime import probe
from kvpipe.runtime.attach import ForwardState, Handle, Session

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# the teacher: reconstruction scores as the shipped stage computes them (pool 1: the gate predicts per token)
TEACHER = {"version": 1, "name": "reconstruction-teacher", "budget": {"keep": 0.5},
           "stages": [{"stage": "reconstruction", "params": {"chunk": 512}}, "uniform", "topk"]}
FLOOR = 1e-6            # ε in log(score + ε): attention below a millionth is "never looked at"
FACT_TEMPLATES = ("Note: the door code for the {name} room is {number}.", "Record {number} belongs to {name}.",
                  "{name}'s ticket number is {number}.")
NAMES = ("Ada", "Bruno", "Chen", "Dalia", "Emre", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mira",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara")


class TeacherSession(Session):
    """An attach that runs the probing stages after the first forward and keeps their scores, compressing
    nothing (the cache keeps every token, so its keys and values are the gate's inputs)."""

    def __init__(self, pipeline: Plan, model: PreTrainedModel, tokenizer=None):
        super().__init__(pipeline, model, tokenizer)
        self.scores: dict[int, torch.Tensor] = {}

    def finish(self, forward: ForwardState) -> None:
        (self.scores,) = probe.run(self, forward).values()


def teacher_targets(model, tokenizer, ids: torch.Tensor, teacher: Plan | None = None):
    """Per layer ``(keys, values, log score)``: ``[1, Hkv, n, D]`` twice and ``float32 [1, Hkv, n]``, for the
    sequence ``ids long [1, n]``."""
    teacher = teacher or validated(Plan, TEACHER)
    with Handle(teacher, model, TeacherSession, tokenizer) as handle, torch.no_grad():
        cache = handle.cache()
        model(ids, past_key_values=cache)
        scores = cast(TeacherSession, handle.session).scores
    return [(layer.keys, layer.values, (scores[i].float() + FLOOR).log())
            for i, layer in enumerate(cache.compressed_layers)]


def distill_loss(gates: RetentionGates, targets) -> torch.Tensor:
    """Mean squared error of the gates' ``log β`` to the teacher's log scores, over every layer, head, token."""
    errors = [(gates(i, keys, values) - target).pow(2) for i, (keys, values, target) in enumerate(targets)]
    return torch.cat([e.flatten() for e in errors]).mean()


def training_text(tokenizer, context: int, seed: int, step: int) -> torch.Tensor:
    """Step ``step``'s sequence, ``long [1, ≤ context]``: a prose window with two to five facts spread in it."""
    rng = random.Random(seed * 100_003 + step)
    prose = paragraphs()
    start, tokens = rng.randrange(len(prose)), 0
    lines: list[str] = []
    while tokens < context:
        line = prose[(start + len(lines)) % len(prose)]
        lines.append(line)
        tokens += len(tokenizer(line, add_special_tokens=False).input_ids) + 1
    for _ in range(rng.randint(2, 5)):
        fact = rng.choice(FACT_TEMPLATES).format(name=rng.choice(NAMES), number=rng.randrange(10_000, 10_000_000))
        lines.insert(rng.randrange(max(len(lines) - 1, 1)), fact)      # before the last line: inside the window
    return tokenizer("\n".join(lines), return_tensors="pt").input_ids[:, :context]
