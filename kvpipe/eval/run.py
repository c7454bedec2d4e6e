"""The main job: a needle-in-a-haystack run, full cache and pipeline side by side, one table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpipe.core.table import human_bytes, render
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.tasks import TaskCase, make_cases, make_question_sets
from kvpipe.models import cache_arg
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


def run_needle(protocol: Protocol, pipeline: Pipeline, context: int, cases: int,
               seed: int = 0) -> tuple[Tally, Tally]:
    """Every case with the full cache, then with the pipeline attached; same prompts, greedy decoding."""
    groups = [[case] for case in make_cases(protocol.tokenizer, context, cases, seed)]
    return _side_by_side(protocol, pipeline, groups, "needle cases")


def run_questions(protocol: Protocol, pipeline: Pipeline, context: int, contexts: int, questions: int,
                  seed: int = 0) -> tuple[Tally, Tally]:
    """Compress once, ask many: each context is prefilled (and compressed) once per cache, then each of its
    ``questions`` is answered on its own fork of that cache. Tallies list the answers context by context."""
    if protocol.question_aware:
        raise ValueError("several questions about one compressed context is the question-agnostic protocol")
    groups = make_question_sets(protocol.tokenizer, context, contexts, questions, seed)
    return _side_by_side(protocol, pipeline, groups, "contexts")


def _side_by_side(protocol: Protocol, pipeline: Pipeline, groups: list[list[TaskCase]],
                  unit: str) -> tuple[Tally, Tally]:
    """Each group of cases (sharing what is compressed) with the full cache, then with the pipeline attached."""
    full, piped = Tally("full cache"), Tally(pipeline.spec.name or pipeline.source)
    for cases in tqdm(groups, desc=unit, unit=unit.split()[-1].rstrip("s")):
        references = protocol.ask_each(cases, DynamicCache(config=protocol.model.config))
        for case, answer in zip(cases, references):
            _record(full, case.is_correct(answer.text), answer.kv_bytes, answer.kv_bytes, answer.prefill_s,
                    answer.decode_tps)
        for case, answer, reference in zip(cases, protocol.ask_pipeline_each(pipeline, cases), references):
            _record(piped, case.is_correct(answer.text), answer.kv_bytes, reference.kv_bytes, answer.prefill_s,
                    answer.decode_tps)
    return full, piped


def per_question(full: Tally, piped: Tally, questions: int) -> str:
    """Accuracy by the asked fact's place in the context (first = nearest the start)."""
    rows = [[f"fact {q + 1} of {questions}", _share(full.correct[q::questions]), _share(piped.correct[q::questions])]
            for q in range(questions)]
    return render(["question", full.name, piped.name], rows)


def _share(outcomes: list[bool]) -> str:
    return f"{sum(outcomes)}/{len(outcomes)}"


def full_cache_correct(protocol: Protocol, prompts: list[TaskCase]) -> int:
    """Cases the uncompressed cache answers correctly: the reference every pipeline is compared with."""
    model = protocol.model
    return sum(case.is_correct(protocol.ask(case, DynamicCache(config=model.config)).text) for case in prompts)


def needle_accuracy(protocol: Protocol, pipeline: Pipeline, prompts: list[TaskCase]) -> tuple[int, float, float]:
    """``(cases answered correctly, mean KV bytes held, compression cost as % of prefill)`` for ``pipeline``."""
    answers = [(case, protocol.ask_pipeline(pipeline, case)) for case in prompts]
    return (sum(case.is_correct(a.text) for case, a in answers), sum(a.kv_bytes for _, a in answers) / len(answers),
            sum(100 * a.compress_s / a.prefill_s for _, a in answers) / len(answers))


def _record(tally: Tally, correct: bool, kv_bytes: int, kv_full: int, prefill_s: float, decode_tps: float) -> None:
    tally.correct.append(correct)
    tally.kv_bytes.append(kv_bytes)
    tally.kv_bytes_full.append(kv_full)
    tally.prefill_s.append(prefill_s)
    tally.decode_tps.append(decode_tps)


def report(full: Tally, piped: Tally, protocol: Protocol, context: int, budget) -> str:
    name = f"question-{protocol.name}"
    headers = ["cache", "protocol", "accuracy", "kept of full's correct", "KV bytes held", "compression",
               "prefill s", "decode tok/s"]
    title = f"needle in a haystack, {context}-token context, budget {budget}; {protocol.describe()}"
    return title + "\n" + render(headers, [full.row(name, None), piped.row(name, full)])
