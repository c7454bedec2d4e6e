"""Eviction stages side by side on the embedded model.

1. Needle accuracy per pipeline (scorer × allocator) and budget, with bytes held and the compression
   phase's cost as a share of prefill time.
2. Fidelity on real prose (the Python documentation): per-token KL to the full cache and perplexity
   increase, for random vs attention mass vs value-aware scores at 70 % and 80 % eviction.
"""
from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

import kvpipe
from kvpipe.core.table import human_bytes, render
from kvpipe.eval.fidelity import fidelity
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.run import full_cache_correct, needle_accuracy
from kvpipe.eval.tasks import KINDS, make_cases, paragraphs
from kvpipe.models import load

NEEDLE_PIPELINES = ["default", "snapkv-adaptive", "value-aware", "global-critical", "expected-attention",
                    "streaming", "random"]
FIDELITY_SCORERS = {"random": "random", "attention_mass": "attention_mass", "critical (value-aware)": "critical",
                    "output_change (value-aware)": "output_change"}


def needle_table(model, tokenizer, names, keeps, kinds, context, cases, question_aware) -> str:
    rows = []
    for kind in kinds:
        prompts = make_cases(tokenizer, context, cases, seed=0, kind=kind)
        protocol = Protocol(model, tokenizer, question_aware)
        full = full_cache_correct(protocol, prompts)
        rows.append([kind, "full cache", "-", f"{full}/{cases}", "-", "-"])
        for name, keep in tqdm([(n, k) for n in names for k in keeps], desc=f"{kind} needles"):
            pipeline = kvpipe.build(name).with_budget(keep=keep)
            correct, held, overhead = needle_accuracy(protocol, pipeline, prompts)
            rows.append([kind, name, keep, f"{correct}/{cases}", human_bytes(held), overhead])
    protocol = "question-aware" if question_aware else "question-agnostic"
    return (f"needles, {context} tokens, {cases} cases per task, {protocol}\n"
            + render(["task", "pipeline", "keep", "correct", "KV bytes held", "compress % of prefill"], rows))


def fidelity_table(model, tokenizer, evictions, context_tokens, continuation_tokens) -> str:
    text = "\n".join(paragraphs()[200:400])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : context_tokens + continuation_tokens]
    context, continuation = ids[:, :context_tokens], ids[:, context_tokens:]
    rows = []
    for label, scorer in tqdm(FIDELITY_SCORERS.items(), desc="fidelity"):
        for evict in evictions:
            pipeline = kvpipe.build({"version": 1, "budget": {"keep": round(1 - evict, 3)}, "stages": [
                {"stage": "sinks_window", "params": {"sinks": 4, "window": 32}},
                {"stage": scorer} if scorer == "random" else {"stage": scorer, "params": {"window": 32}},
                "uniform", "topk"]})
            result = fidelity(model, pipeline, context, continuation)
            rows.append([label, f"{evict:.0%}", result.kl, result.ppl_full, result.ppl, 100 * result.ppl_increase])
    return (f"fidelity on Python docs prose: {context_tokens}-token context compressed, then {continuation_tokens} "
            "tokens teacher-forced\n"
            + render(["scorer", "evicted", "KL nats/token", "ppl full", "ppl", "ppl increase %"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", default=NEEDLE_PIPELINES, help="shipped names or YAML paths")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--kinds", nargs="+", default=["single", "multikey", "multivalue"], choices=KINDS)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--question-aware", action="store_true")
    parser.add_argument("--evictions", type=float, nargs="+", default=[0.7, 0.8])
    parser.add_argument("--skip-needle", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load()
    torch.manual_seed(0)
    if not args.skip_fidelity:
        print(fidelity_table(model, tokenizer, args.evictions, 1024, 256), flush=True)
    if not args.skip_needle:
        print(needle_table(model, tokenizer, args.pipelines, args.keeps, args.kinds, args.context, args.cases,
                           args.question_aware), flush=True)


if __name__ == "__main__":
    main()
