"""The fixed-contract diagnostic (arXiv 2605.08234): why a pipeline fails on a case, one decision at a time.

Per needle case, with the pipeline as given (the *contract*) and the full cache as reference:

* **margin** = log-likelihood of the answer with the full cache minus with the compressed one
  (positive = compression hurt; near zero or negative = a boundary case);
* **evidence kept**: of every (layer, KV head), the share of the answer-bearing tokens still stored, and
  the share of heads holding only part of them (a split fact);
* **failure mode** of a case the full cache answers and the pipeline does not:
  ``coupled evidence split`` (most heads keep part of the fact), else ``evidence missing`` (most of it is
  gone), else ``irrelevant ranked in`` (the fact is kept, yet the budget went to tokens that mislead);
* **probes** — the contract with exactly one decision slot changed: ``recovery`` (``recover_evidence``
  inserted before ranking), ``value ranking`` (the last scorer replaced by value-aware ``critical``),
  ``coupled projection`` (``topk`` replaced by ``coupled_projection``): answer log-likelihood and
  correctness for each.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpipe.core.plotting import pyplot
from kvpipe.core.registry import get_stage
from kvpipe.core.table import render
from kvpipe.eval.choices import PROBES
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.tasks import TaskCase, make_cases
from kvpipe.runtime.pipeline import Pipeline, build

MODES = ("evidence missing", "irrelevant ranked in", "coupled evidence split")


@dataclass
class CaseRecord:
    kind: str
    case: int
    depth: float
    full_correct: bool
    correct: bool
    loglik_full: float
    loglik: float
    evidence_kept: float          # mean over (layer, head) of the share of evidence tokens stored
    evidence_split: float         # share of (layer, head) holding part, not all, of the evidence
    mode: str | None              # failure mode when the full cache is right and the pipeline wrong
    probes: dict[str, dict] = field(default_factory=dict)

    @property
    def margin(self) -> float:
        return self.loglik_full - self.loglik


def probe_specs(pipeline: Pipeline) -> dict[str, dict]:
    """The contract with one decision slot changed, per probe that applies to this pipeline."""
    stages = pipeline.spec.model_dump(mode="python", exclude_none=True)["stages"]
    family = {s["stage"]: get_stage(s["stage"]).family for s in stages}
    ids = [s.get("id") or s["stage"] for s in stages]
    probes = {}
    if "recover_evidence" not in family:
        candidates = [i for i, s in enumerate(stages) if family[s["stage"]] == "candidate selection"]
        at = candidates[-1] + 1 if candidates else 0
        recovery: dict[str, object] = {"stage": "recover_evidence", "id": "probe_recovery"}
        changed = copy.deepcopy(stages)
        if candidates:
            anchor = ids[candidates[-1]]
            recovery["after"] = [anchor]
            for stage in changed:       # what hung after the candidate stage now hangs after the recovery
                if anchor in stage.get("after", []):
                    stage["after"] = ["probe_recovery" if a == anchor else a for a in stage["after"]]
        probes["recovery"] = _with_stages(pipeline, changed[:at] + [recovery] + changed[at:])
    scorers = [i for i, s in enumerate(stages) if family[s["stage"]] == "scoring"]
    if scorers and stages[scorers[-1]]["stage"] != "critical":
        changed = copy.deepcopy(stages)
        last = changed[scorers[-1]]         # same id and place: everything downstream reads it as before
        changed[scorers[-1]] = {k: v for k, v in last.items() if k in ("id", "after")} | {
            "stage": "critical", "params": {"window": 64, "pool": 15}, "id": ids[scorers[-1]]}
        probes["value ranking"] = _with_stages(pipeline, changed)
    evictors = [i for i, s in enumerate(stages) if s["stage"] == "topk"]
    if evictors:
        changed = copy.deepcopy(stages)
        changed[evictors[0]] = {"stage": "coupled_projection", "id": ids[evictors[0]], "params": {"block": 16},
                                **({"after": changed[evictors[0]]["after"]} if "after" in changed[evictors[0]] else {})}
        probes["coupled projection"] = _with_stages(pipeline, changed)
    return probes


def _with_stages(pipeline: Pipeline, stages: list[dict]) -> dict:
    data = pipeline.spec.model_dump(mode="python", exclude_none=True)
    data["stages"] = stages
    return data


def gold_ids(tokenizer, case: TaskCase) -> torch.Tensor:
    """``long [k]``: the expected answers as tokens, the continuation whose log-likelihood is compared."""
    return tokenizer(" ".join(case.answers), add_special_tokens=False, return_tensors="pt").input_ids[0]


def evidence_stats(cache, case: TaskCase) -> tuple[float, float]:
    """(mean share of evidence tokens stored per (layer, head), share of heads holding part of it)."""
    evidence = torch.tensor(case.evidence)
    shares = []
    for layer in cache.compressed_layers:
        if layer.store is None:
            shares.append(torch.ones(layer.keys.shape[1]))
            continue
        _, _, positions = layer.store.padded()
        stored = (positions[0][..., None] == evidence).any(-2)                            # [Hkv, E]
        shares.append(stored.float().mean(-1))
    every = torch.cat(shares)
    return float(every.mean()), float(((every > 0) & (every < 1)).float().mean())


def classify(record: CaseRecord) -> str | None:
    if not record.full_correct or record.correct:
        return None
    if record.evidence_split >= 0.5:
        return "coupled evidence split"
    return "evidence missing" if record.evidence_kept < 0.5 else "irrelevant ranked in"


@dataclass(frozen=True)
class Reference:
    """The full cache on one case: whether it answers, and the answer's log-likelihood."""
    correct: bool
    loglik: float


def diagnose_cases(tokenizer, kinds: list[str], context: int, cases: int, seed: int = 0):
    """``[(kind, index, case)]``: the cases every pipeline of one diagnostic run is measured on."""
    return [(kind, i, case) for kind in kinds
            for i, case in enumerate(make_cases(tokenizer, context, cases, seed, kind=kind))]


def full_reference(protocol: Protocol, work) -> list[Reference]:
    """The full cache on every case, computed once and shared by every pipeline and budget diagnosed."""
    out = []
    for _, _, case in tqdm(work, desc="full cache", unit="case"):
        full = protocol.ask(case, DynamicCache(config=protocol.model.config),
                            reference=gold_ids(protocol.tokenizer, case))
        out.append(Reference(case.is_correct(full.text), full.score.loglik))
    return out


def _extend_with_evidence(evidence: list[float], case: TaskCase, cache) -> None:
    """``after_prefill`` of a diagnosed case: what the compressed ``cache`` kept of the case's evidence."""
    evidence.extend(evidence_stats(cache, case))


def diagnose(protocol: Protocol, pipeline: Pipeline, work, reference: list[Reference],
             probes: tuple[str, ...] = PROBES) -> list[CaseRecord]:
    """One record per case of ``work`` (``diagnose_cases``), against the full cache's ``reference``; each
    probe named in ``probes`` that applies to the pipeline reruns the case with its one slot changed."""
    reruns = {name: build(spec) for name, spec in probe_specs(pipeline).items() if name in probes}
    records = []
    for (kind, i, case), full in tqdm(list(zip(work, reference)), desc="diagnose", unit="case"):
        gold, evidence = gold_ids(protocol.tokenizer, case), cast(list[float], [])
        mine = protocol.ask_pipeline(pipeline, case, gold, after_prefill=partial(_extend_with_evidence, evidence, case))
        kept, split = evidence
        record = CaseRecord(kind, i, case.depth, full.correct, case.is_correct(mine.text), full.loglik,
                            mine.score.loglik, kept, split, None)
        record.mode = classify(record)
        for name, probe in reruns.items():
            probed = protocol.ask_pipeline(probe, case, gold)
            record.probes[name] = {"correct": case.is_correct(probed.text), "loglik": probed.score.loglik,
                                   "gain": probed.score.loglik - mine.score.loglik}
        records.append(record)
    return records


def summary(records: list[CaseRecord], name: str) -> str:
    failures = [r for r in records if r.mode is not None]
    kinds = list(dict.fromkeys(r.kind for r in records))
    counts = [[mode, *(sum(r.mode == mode and r.kind == k for r in failures) for k in kinds),
               sum(r.mode == mode for r in failures)] for mode in MODES]
    def correct_of(kind_records):
        return f"{sum(r.correct for r in kind_records)}/{sum(r.full_correct for r in kind_records)}"
    counts.append(["correct / full cache correct", *(correct_of([r for r in records if r.kind == k])
                                                     for k in kinds), correct_of(records)])
    lines = [f"{name}: {sum(r.correct for r in records)}/{len(records)} correct "
             f"(full cache {sum(r.full_correct for r in records)}); {len(failures)} failures by mode",
             render(["failure mode", *kinds, "all"], counts)]
    probe_names = sorted({p for r in records for p in r.probes})
    rows = []
    for probe in probe_names:
        for label, subset in (("positive margin", [r for r in records if r.margin > 0.5]),
                              ("boundary", [r for r in records if r.margin <= 0.5])):
            helped = [r.probes[probe]["gain"] > 0 for r in subset]
            fixed = sum(r.probes[probe]["correct"] and not r.correct for r in subset)
            broke = sum(r.correct and not r.probes[probe]["correct"] for r in subset)
            share = f"{100 * sum(helped) / len(helped):.0f}%" if helped else "-"
            rows.append([probe, label, len(subset), share, fixed, broke])
    if rows:
        lines.append("probes (one slot changed; margin = full − compressed answer log-likelihood, boundary ≤ 0.5 nats)")
        lines.append(render(["probe", "cases", "n", "log-lik improves", "fixed", "broke"], rows))
    return "\n".join(lines)


def save(records: list[CaseRecord], out: Path, name: str, plots: bool = True) -> list[Path]:
    """``out/<name>.jsonl`` (one record per case) and, with ``plots``, ``out/<name>.png`` (margin per case,
    coloured by mode)."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(asdict(r) | {"margin": r.margin}) + "\n" for r in records))
    written = [jsonl]
    if not plots:
        return written
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colours = {None: "tab:gray", **dict(zip(MODES, ("tab:red", "tab:orange", "tab:purple")))}
    for mode, colour in colours.items():
        chosen = [r for r in records if r.mode == mode]
        ax.scatter([r.evidence_kept for r in chosen], [r.margin for r in chosen], c=colour,
                   label=mode or "not a failure", s=24)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("share of evidence tokens kept (mean over layers and heads)")
    ax.set_ylabel("margin: full − compressed log-lik (nats)")
    ax.set_title(f"fixed-contract diagnostic: {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / f"{name}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return written + [png]
