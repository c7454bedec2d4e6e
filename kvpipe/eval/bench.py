"""``kvpipe bench SUITE.yaml``: every contender of a suite on the same cases, side by side in one process.

For each context length, task and case, the full cache answers first (its answer and bytes are the reference
for that case, computed once); then every pipeline at every budget and every peer answer the same prompt with
greedy decoding. One JSON line per answer goes to ``results.jsonl`` as it is produced, so a long run that is
stopped keeps what it did. ``report.md`` and the plots are written from those lines at the end.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import time
import warnings
from itertools import chain, product
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpipe.errors import BudgetError, KVPipeError
from kvpipe.eval.contenders import (
    QUANTIZED_PEERS,
    Contender,
    FullCache,
    PipelineContender,
    QuantizedPeer,
    kvpress_available,
    peer,
)
from kvpipe.eval.fidelity import compare
from kvpipe.eval.protocol import Answer, Protocol
from kvpipe.eval.shard import Shard, merged, wait_for_all
from kvpipe.eval.suite import SuiteSpec
from kvpipe.eval.tasks import TaskCase, make_cases, make_question_sets, paragraphs
from kvpipe.runtime.backend import resolve_backend
from kvpipe.runtime.capture import Capture, capture
from kvpipe.runtime.pipeline import build
from kvpipe.version import __version__

PROTOCOLS = {"agnostic": (False,), "aware": (True,), "both": (False, True)}
FIDELITY_PARAGRAPHS = slice(600, 900)   # held out: far from where the haystacks usually start

ALONE = Shard()          # one process runs every case


def contenders(suite: SuiteSpec, suite_dir: Path) -> tuple[list[Contender], list[dict]]:
    """Pipelines × their budgets, then peers (kvpress ones at every suite budget), and the peers that cannot run
    here with the reason (kvpress not installed: the report lists them). Built before any model loads, so a bad
    pipeline file or an impossible budget fails fast."""
    out: list[Contender] = []
    skipped: list[dict] = []
    for entry in suite.pipelines:
        local = suite_dir / entry.pipeline
        base = build(local if local.is_file() else entry.pipeline)
        name = entry.label or base.spec.name or Path(entry.pipeline).stem
        # a pipeline that evicts nothing (noop, quantize-only) has no budget to sweep: it runs once, as it is
        if entry.budgets == "own" or not base.evicts:
            out.append(PipelineContender(name, base, f"own {base.spec.budget}" if base.spec.budget else "own"))
            continue
        for budget in entry.budgets or suite.budgets:
            out.append(PipelineContender(name, base.with_budget(**{budget.kind: getattr(budget, budget.kind)}),
                                         str(budget)))
    for name in suite.peers:
        if name.startswith("kvpress-") and not kvpress_available():
            skipped.append({"kind": "skipped", "contender": name, "reason": "kvpress is not installed (kvpress 0.5.5 "
                            "needs transformers<5.3; `make test-tf52` builds such an environment)"})
            continue
        out += [peer(name, None)] if name in QUANTIZED_PEERS else [peer(name, b) for b in suite.budgets]
    return out, skipped


def environment(suite: SuiteSpec, share: bool = True, always_generate: bool = False) -> dict:
    """What a reader needs to reproduce the numbers."""
    import transformers

    versions = {"kvpipe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        versions["kvpress"] = importlib.metadata.version("kvpress")      # kvpress has no __version__
    except importlib.metadata.PackageNotFoundError:
        versions["kvpress"] = "not installed"
    return {"kind": "environment", "suite": suite.name, "model": suite.model, "seed": suite.seed,
            "cases": suite.cases, "questions_per_context": suite.questions_per_context, "haystack": suite.haystack,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "shared_prefill": share,
            "always_generate": always_generate, **versions}


def run_suite(suite: SuiteSpec, suite_dir: Path, model, tokenizer, out_dir: Path, progress: bool = True,
              share: bool = True, always_generate: bool = False, shard: Shard = ALONE) -> list[dict]:
    """Run everything; returns the records also written to ``out_dir/results.jsonl`` (as they come).
    ``share=False``: every contender runs its own prefill; ``always_generate``: every contender generates
    (both to check and to measure what the shortcuts save; the records are the same).

    ``shard``: this process's share of the cases (``kvpipe.eval.shard``); it writes ``results.rank{r}.jsonl``, and
    rank 0 returns (and writes) every rank's records merged, the others their own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    field, skipped = contenders(suite, suite_dir)
    for record in skipped:
        warnings.warn(f"{record['contender']} not run: {record['reason']}", stacklevel=2)
    field = [FullCache(), *field]
    units = len(suite.contexts) * len(suite.tasks) * len(PROTOCOLS[suite.questions]) * suite.cases
    answers = len(range(shard.rank, units, shard.world)) * suite.questions_per_context * len(field)
    records: list[dict] = []
    started = time.perf_counter()
    with open(shard.records_file(out_dir), "w") as sink, \
            tqdm(total=answers, desc=f"bench {suite.name}" + (f" rank {shard.rank}" if shard.world > 1 else ""),
                 unit="answer", disable=not progress) as bar:
        fidelity = fidelity_records(suite, field, model, tokenizer, progress) if suite.fidelity and not shard.rank \
            else []
        answered = task_records(suite, field, model, tokenizer, bar, share, always_generate, shard)
        for record in chain([environment(suite, share, always_generate)], skipped, answered, fidelity,
                            _finished(started)):
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    wait_for_all(shard)
    if shard.world == 1 or shard.rank:
        return records
    protocols = ["aware" if aware else "agnostic" for aware in PROTOCOLS[suite.questions]]
    return merged(out_dir, shard.world, lambda r: (suite.contexts.index(r["context"]), suite.tasks.index(r["task"]),
                                                   protocols.index(r["protocol"]), r["case"]))


def _finished(started: float):
    """The last record: the run's wall time (model loading excluded), for the report's reader."""
    yield {"kind": "finished", "seconds": round(time.perf_counter() - started, 1)}


def task_records(suite: SuiteSpec, field: list[Contender], model, tokenizer, bar, share: bool = True,
                 always_generate: bool = False, shard: Shard = ALONE):
    """Every contender on every case. ``field[0]`` (the full cache) answers first: its greedy answer is the
    reference every other contender's likelihood is scored on.

    ``share``: the compressed part of a case is prefilled once; the full cache and transformers' quantized
    caches are filled from it and every pipeline compresses a fork of it (``kvpipe.runtime.capture``, tested
    equal to running each alone); kvpress peers run their own pipeline. Unless ``always_generate``, a
    contender whose score proves that greedy decoding returns the full cache's answer skips generation.
    ``shard``: only its units (one context, task, protocol and case group each) are run."""
    full = field[0]
    for unit, (context, task, aware, i, cases) in enumerate(work_units(suite, tokenizer)):
        if not shard.takes(unit):
            continue
        protocol = Protocol(model, tokenizer, aware, skip_proven=not always_generate)
        captures = Captures(model, protocol.compressed_part(cases[0])) if share else None
        references = full.answer(protocol, cases, captured=_captured(full, captures))
        for contender in field:
            bar.set_postfix_str(f"{context} {task} {contender.label}"[:60])
            outcomes = references if contender is full else _try(contender, protocol, cases, references, captures)
            for j, (case, reference) in enumerate(zip(cases, references)):
                outcome = outcomes if isinstance(outcomes, BudgetError) else outcomes[j]
                yield {"kind": "task", "context": context, "task": task, "case": i, "question": j,
                       "protocol": protocol.name, "expected": list(case.answers),
                       "full_correct": case.is_correct(reference.text), "kv_bytes_full": reference.kv_bytes,
                       "loglik_full": reference.score.loglik, "shared": share, **_describe(contender),
                       **_outcome(outcome, case, reference)}
                bar.update()


def work_units(suite: SuiteSpec, tokenizer):
    """``(context, task, question_aware, case index, case group)`` in the order one process runs them: the unit
    of work a shard takes whole (the cases of a group share their compressed part)."""
    for context, task in product(suite.contexts, suite.tasks):
        groups = list(enumerate(case_groups(suite, tokenizer, context, task)))
        for aware, (i, cases) in product(PROTOCOLS[suite.questions], groups):
            yield context, task, aware, i, cases


def case_groups(suite: SuiteSpec, tokenizer, context: int, task: str) -> list[list[TaskCase]]:
    """The cases of one task, grouped by the context they share: one case a group, or with
    ``questions_per_context`` the questions about one context (compressed once, asked apart)."""
    if suite.questions_per_context > 1:
        return make_question_sets(tokenizer, context, suite.cases, suite.questions_per_context, suite.seed,
                                  suite.haystack)
    return [[case] for case in make_cases(tokenizer, context, suite.cases, suite.seed, task, suite.needles,
                                          suite.haystack)]


class Captures:
    """The compressed part of one case prefilled once per kernel backend asked for, on demand."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.ids = model, ids
        self.by_backend: dict[str, Capture] = {}

    def get(self, backend: str) -> Capture:
        backend = resolve_backend(backend, self.ids.device)
        if backend not in self.by_backend:
            self.by_backend[backend] = capture(self.model, self.ids, backend=backend)
        return self.by_backend[backend]


def _captured(contender: Contender, captures: Captures | None) -> Capture | None:
    """The shared prefill ``contender`` starts from: pipelines at their kernel backend, the full and the
    quantized caches at any (their keys and values are the same); kvpress peers run their own pipeline."""
    if captures is None:
        return None
    if isinstance(contender, PipelineContender):
        return captures.get(contender.pipeline.spec.backend)
    return captures.get("torch") if isinstance(contender, (FullCache, QuantizedPeer)) else None


def fidelity_ids(tokenizer) -> torch.Tensor:
    """``long [1, n]``: the held-out prose fidelity is measured on."""
    return tokenizer("\n".join(paragraphs()[FIDELITY_PARAGRAPHS]), return_tensors="pt").input_ids


def check_fidelity(suite: SuiteSpec, tokenizer) -> None:
    """Before any task runs: the held-out prose must be long enough for ``fidelity``'s context + continuation."""
    if suite.fidelity is None:
        return
    need, have = suite.fidelity.context + suite.fidelity.continuation, fidelity_ids(tokenizer).shape[1]
    if need > have:
        raise KVPipeError(f"fidelity needs {need:,} tokens of held-out prose (context + continuation) but there "
                          f"are {have:,} with this tokenizer; lower fidelity.context")


def fidelity_records(suite: SuiteSpec, field: list[Contender], model, tokenizer, progress: bool):
    """KL to the full cache and perplexity on held-out documentation prose, teacher-forced."""
    spec = suite.fidelity
    ids = fidelity_ids(tokenizer)
    context, continuation = ids[:, :spec.context], ids[:, spec.context:spec.context + spec.continuation]
    reference = field[0].logits(model, context, continuation, tokenizer)
    for contender in tqdm(field[1:], desc="fidelity", disable=not progress):
        try:
            result = compare(reference, contender.logits(model, context, continuation, tokenizer),
                             continuation[0])
            numbers: dict[str, float | str] = {"kl": result.kl, "ppl_full": result.ppl_full, "ppl": result.ppl}
        except BudgetError as err:
            numbers = {"refused": str(err)}
        yield {"kind": "fidelity", "context": spec.context, "continuation": spec.continuation,
               **_describe(contender), **numbers}


def _try(contender: Contender, protocol: Protocol, cases: list[TaskCase], references: list[Answer],
         captures: Captures | None) -> list[Answer] | BudgetError:
    try:
        return contender.answer(protocol, cases, [r.tokens for r in references], _captured(contender, captures))
    except BudgetError as err:   # e.g. a keep fraction below the protected window on this context: say so
        return err


def _describe(contender: Contender) -> dict:
    return {"contender": contender.label, "name": contender.name, "family": contender.family,
            "budget": contender.budget}


def _outcome(outcome: Answer | BudgetError, case, reference: Answer) -> dict:
    if isinstance(outcome, BudgetError):
        return {"refused": str(outcome), "correct": False}
    score = outcome.score
    return {"correct": case.is_correct(outcome.text), "answer": outcome.text, "kv_bytes": outcome.kv_bytes,
            "bytes_fraction": outcome.kv_bytes / reference.kv_bytes, "prefill_s": outcome.prefill_s,
            "decode_tps": outcome.decode_tps, "compress_s": outcome.compress_s, "loglik": score.loglik,
            "margin": reference.score.loglik - score.loglik, "greedy_kept": score.greedy,
            "generated": outcome.generated}
