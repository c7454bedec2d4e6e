"""``kvpipe demo``: what kvpipe is for, in about two minutes on a laptop's CPU.

A long document is compressed **once, before any question is seen** (how a compressed context is reused), then
asked about. Four caches answer the same cases, greedy, side by side:

* the full cache — the reference;
* ``default`` — evicts by the attention the prompt's last tokens paid: fine when the question is in the prompt,
  poor when it comes later (the fact it asks for was not looked at, so it was evicted);
* ``int4`` — keeps every token, in 4-bit pages: the answers at a fraction of the bytes;
* ``agnostic`` — evicts by how well the model can re-read its context from what is kept (KVzip): a quarter of the
  tokens, chosen without the question.

Each row prints as soon as its cases are answered; then one context is compressed once (``int4``) and asked
several questions, each on its own fork of the cache.
"""
from __future__ import annotations

import time
from typing import Callable

from transformers import DynamicCache

from kvpipe.core.table import human_bytes
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.tasks import make_cases, make_question_sets
from kvpipe.runtime.pipeline import build

PIPELINES = {
    "default": "evicts by the attention the prompt paid before the question came: the asked fact is often gone",
    "int4": "every token kept, in 4-bit pages (KIVI): about a seventh of the bytes, no token chosen",
    "agnostic": "a quarter of the tokens, chosen by how well the model re-reads its context from them (KVzip)",
}
COLUMNS = (("cache", 12), ("answers", 8), ("KV held", 10), ("smaller", 8), ("s/case", 7))


def row(*cells) -> str:
    return "  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                     for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS)))


def run_demo(protocol: Protocol, context: int, cases: int, questions: int, seed: int = 0, forked: str = "int4",
             say: Callable[[str], None] = print) -> dict[str, list[bool]]:
    """Print the side-by-side table and the forks; returns each cache's outcomes per case (full cache first)."""
    tokenizer = protocol.tokenizer
    work = make_cases(tokenizer, context, cases, seed)
    say(f"{cases} documents of {context} tokens (Python's own docs) with one fact hidden in each; every cache below "
        "is filled with the document alone, then asked for the fact.\n")
    say(row(*(name for name, _ in COLUMNS)))
    outcomes: dict[str, list[bool]] = {}
    full_bytes = 0.0
    for name in ("full cache", *PIPELINES):
        started, pipeline = time.perf_counter(), None if name == "full cache" else build(name)
        answers = [protocol.ask(case, DynamicCache(config=protocol.model.config)) if pipeline is None
                   else protocol.ask_pipeline(pipeline, case) for case in work]
        held = sum(answer.kv_bytes for answer in answers) / len(answers)
        full_bytes = full_bytes or held
        outcomes[name] = [case.is_correct(answer.text) for case, answer in zip(work, answers)]
        say(row(name, f"{sum(outcomes[name])}/{cases}", human_bytes(held), f"{full_bytes / held:.1f}x",
                f"{(time.perf_counter() - started) / cases:.1f}") + f"   {PIPELINES.get(name, 'the reference')}")
    full = outcomes["full cache"]
    for name in PIPELINES:
        kept = sum(a and b for a, b in zip(outcomes[name], full))
        everything = " (all)" if kept == sum(full) else ""
        say(f"{name} kept {kept} of the full cache's {sum(full)} right answers{everything}")
    say(f"\nCompress once, ask many: one document with {questions} facts, compressed once by `{forked}`; each "
        "question is answered on its own fork of that cache (cache.fork(): shared tensors, no copy).")
    group = make_question_sets(tokenizer, context, 1, questions, seed + 1)[0]
    references = protocol.ask_each(group, DynamicCache(config=protocol.model.config))
    for case, reference, answer in zip(group, references, protocol.ask_pipeline_each(build(forked), group)):
        verdicts = ["right" if case.is_correct(a.text) else "wrong" for a in (reference, answer)]
        say(f"  asked for {' / '.join(case.answers)}: full cache {verdicts[0]}, {forked} fork {verdicts[1]} "
            f"({answer.text.strip()[:70]!r})")
    return outcomes
