"""The main job: a needle-in-a-haystack run, full cache and pipeline side by side, one table."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpipe.core.table import human_bytes, render
from kvpipe.eval.tasks import TaskCase, make_cases
from kvpipe.models import cache_arg
from kvpipe.runtime.cache import cache_bytes
from kvpipe.runtime.pipeline import Pipeline


@dataclass
class Tally:
    """Results of one cache kind over all cases."""

    name: str
    correct: list[bool] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    kv_bytes_full: list[int] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)

    def row(self, protocol: str, reference: Tally | None) -> list:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        agree = (f"{sum(a and b for a, b in zip(self.correct, reference.correct))}/{sum(reference.correct)}"
                 if reference is not None else "-")
        return [self.name, protocol, f"{sum(self.correct)}/{len(self.correct)}", agree,
                human_bytes(mean(self.kv_bytes)), mean(self.kv_bytes_full) / mean(self.kv_bytes),
                mean(self.prefill_s), mean(self.decode_tps)]


def answer(model, tokenizer, case: TaskCase, cache, question_aware: bool,
           after_prefill: Callable[[object], None] | None = None) -> tuple[str, float, float]:
    """Generate an answer; returns ``(text, prefill seconds, decode tokens/s)``.

    Prefill = the compressed part: the context alone (question-agnostic), or the whole prompt but its
    last token (question-aware). ``after_prefill(cache)`` runs then (to measure what the cache holds);
    ``generate()`` resumes from the cache with the rest.
    """
    ids = case.ids
    prefill = ids[:, :-1] if question_aware else case.prefix_ids
    with torch.inference_mode():
        start = time.perf_counter()
        model(prefill, **cache_arg(model, cache))
        prefill_s = time.perf_counter() - start
        if after_prefill is not None:
            after_prefill(cache)
        start = time.perf_counter()
        # An explicit mask: SmolLM2's pad token is its <|im_end|>, which the chat prompt contains, and
        # transformers < 5.3 would otherwise infer a mask that hides those tokens and shifts positions.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_arg(model, cache),
                             max_new_tokens=case.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        decode_s = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), prefill_s, len(new) / decode_s


def prefill_then_decode(model, ids: torch.Tensor, cache, new_tokens: int) -> tuple[float, float]:
    """``(prefill seconds, decode tokens/s)``: all of ``ids`` but the last token as one forward into ``cache``,
    then exactly ``new_tokens`` greedy tokens."""
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids[:, :-1], **cache_arg(model, cache))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, **cache_arg(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
        decode = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)
    return prefill, decode


def run_needle(model, tokenizer, pipeline: Pipeline, context: int, cases: int, question_aware: bool,
               seed: int = 0) -> tuple[Tally, Tally]:
    """Every case with the full cache, then with the pipeline attached; same prompts, greedy decoding."""
    full, piped = Tally("full cache"), Tally(pipeline.spec.name or pipeline.source)
    for case in tqdm(make_cases(tokenizer, context, cases, seed), desc="needle cases", unit="case"):
        cache = DynamicCache(config=model.config)
        text, prefill_s, tps = answer(model, tokenizer, case, cache, question_aware)
        held = cache_bytes(cache)
        _record(full, case.is_correct(text), held, held, prefill_s, tps)
        with pipeline.attach(model) as handle:
            cache = handle.cache()
            text, prefill_s, tps = answer(model, tokenizer, case, cache, question_aware)
            stats = handle.stats(cache)
        _record(piped, case.is_correct(text), stats["kv_bytes"], stats["kv_bytes_full"], prefill_s, tps)
    return full, piped


def full_cache_correct(model, tokenizer, prompts: list[TaskCase], question_aware: bool) -> int:
    """Cases the uncompressed cache answers correctly: the reference every pipeline is compared with."""
    return sum(case.is_correct(answer(model, tokenizer, case, DynamicCache(config=model.config), question_aware)[0])
               for case in prompts)


def needle_accuracy(model, tokenizer, pipeline: Pipeline, prompts: list[TaskCase],
                    question_aware: bool) -> tuple[int, float, float]:
    """``(cases answered correctly, mean KV bytes held, compression cost as % of prefill)`` for ``pipeline``."""
    correct, held, overhead = 0, [], []
    for case in prompts:
        with pipeline.attach(model) as handle:
            cache = handle.cache()
            text, prefill_s, _ = answer(model, tokenizer, case, cache, question_aware)
            stats = handle.stats(cache)
        correct += case.is_correct(text)
        held.append(stats["kv_bytes"])
        overhead.append(100 * stats["compress_seconds"] / prefill_s)
    return correct, sum(held) / len(held), sum(overhead) / len(overhead)


def _record(tally: Tally, correct, kv_bytes, kv_full, prefill_s, tps) -> None:
    tally.correct.append(correct)
    tally.kv_bytes.append(kv_bytes)
    tally.kv_bytes_full.append(kv_full)
    tally.prefill_s.append(prefill_s)
    tally.decode_tps.append(tps)


def report(full: Tally, piped: Tally, question_aware: bool, context: int, budget) -> str:
    protocol = "question-aware" if question_aware else "question-agnostic"
    headers = ["cache", "protocol", "accuracy", "kept of full's correct", "KV bytes held", "compression",
               "prefill s", "decode tok/s"]
    title = (f"needle in a haystack, {context}-token context, budget {budget}; {protocol}: "
             + ("the question is compressed with the context" if question_aware
                else "the context is compressed before the question is seen"))
    return title + "\n" + render(headers, [full.row(protocol, None), piped.row(protocol, full)])
