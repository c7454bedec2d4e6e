"""Learned retention gates against their ablations and the heuristic baselines, at equal token budgets.

Variants: trained gates with the shared readout (the shipped file, or --gates), trained gates with per-layer
readouts (--unshared-gates, from `kvpipe train-gates --unshared`), and untrained gates (the prior: β = σ(10)
for every token, i.e. pure recency), each with `global` and with `uniform` allocation; baselines:
attention mass (the default pipeline), SnapKV + AdaKV, value-aware (CriticalKV). Every pipeline keeps
`tokens` slots per KV head on average, after the same sinks + window protection.

Prints needle accuracy (single / multi-key / multi-value, question-agnostic: the context is compressed before
the question, where a query-agnostic learned policy is meant to shine), KL to the full cache on held-out
prose, and bytes held.

Examples:
    python benchmarks/bench_learned.py                                   # 2k and 4k, budgets 128/256/512
    python benchmarks/bench_learned.py --contexts 2048 --budgets 128 --cases 3 --kinds single multikey
"""
from __future__ import annotations

import argparse
import tempfile

from tqdm.auto import tqdm

import kvpipe
from kvpipe.core.gates import RetentionGates
from kvpipe.core.table import human_bytes, render
from kvpipe.eval.fidelity import fidelity
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.run import full_cache_correct, needle_accuracy
from kvpipe.eval.tasks import KINDS, make_cases, paragraphs
from kvpipe.models import load

PROTECT = {"stage": "sinks_window", "params": {"sinks": 4, "window": 16}}
BASELINES = {
    "attention mass + uniform": [{"stage": "attention_mass", "params": {"window": 64, "pool": 15}}, "uniform"],
    "snapkv + uniform": [{"stage": "snapkv", "params": {"window": 64}}, "uniform"],
    "snapkv + adaptive": [{"stage": "snapkv", "params": {"window": 64}}, {"stage": "adaptive_heads"}],
    "value-aware + uniform": [{"stage": "critical", "params": {"window": 64, "pool": 15}}, "uniform"],
}


def variants(gates: str, unshared: str | None, prior: str) -> dict[str, list]:
    files = {"learned (shared readout)": gates, "prior only (untrained)": prior}
    if unshared:
        files["learned (per-layer readouts)"] = unshared
    out = {}
    for label, path in files.items():
        score = {"stage": "retention_gates", "params": {"gates": path}}
        out[f"{label} + global"] = [score, {"stage": "global", "params": {"calibration": "none", "floor": 0.05}}]
        if path != prior:  # the prior scores by position alone, the same in every head: global = uniform
            out[f"{label} + uniform"] = [score, "uniform"]
    return out | BASELINES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512], help="tokens per KV head")
    parser.add_argument("--kinds", nargs="+", default=["single", "multikey", "multivalue"], choices=KINDS)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--gates", default="smollm2-135m", help="trained gates (shared readout)")
    parser.add_argument("--unshared-gates", help="gates trained with --unshared (optional variant)")
    parser.add_argument("--kl-tokens", type=int, default=256, help="teacher-forced tokens for the KL column")
    args = parser.parse_args()

    model, tokenizer = load()
    trained = RetentionGates.load(args.gates)[0]
    prior = f"{tempfile.mkdtemp()}/prior.safetensors"
    RetentionGates(trained.layers, trained.heads, trained.head_dim, trained.hidden).save(prior, {"note": "untrained"})
    pipelines = variants(args.gates, args.unshared_gates, prior)
    prose = tokenizer("\n".join(paragraphs()[600:900]), return_tensors="pt").input_ids
    rows, header = [], ["context", "budget", "pipeline", *args.kinds, "KL nats/token", "KV bytes held"]
    for context in args.contexts:
        cases = {kind: make_cases(tokenizer, context, args.cases, seed=7, kind=kind) for kind in args.kinds}
        protocol = Protocol(model, tokenizer)
        full = [full_cache_correct(protocol, cases[kind]) for kind in args.kinds]
        rows.append([context, "-", "full cache", *(f"{n}/{args.cases}" for n in full), 0.0, "-"])
        held_out = prose[:, :context + args.kl_tokens]
        for budget, (name, stages) in tqdm([(b, p) for b in args.budgets for p in pipelines.items()],
                                           desc=f"{context} tokens"):
            pipeline = kvpipe.build({"version": 1, "name": name, "budget": {"tokens": budget},
                                     "stages": [PROTECT, *stages, "topk"]})
            accuracy, held = [], []
            for kind in args.kinds:
                correct, bytes_held, _ = needle_accuracy(protocol, pipeline, cases[kind])
                accuracy.append(f"{correct}/{args.cases}")
                held.append(bytes_held)
            kl = fidelity(model, pipeline, held_out[:, :context], held_out[:, context:]).kl
            rows.append([context, budget, name, *accuracy, kl, human_bytes(sum(held) / len(held))])
            tqdm.write(" | ".join(map(str, rows[-1])))  # a long run that is stopped keeps its rows
    print(f"SmolLM2-135M, question-agnostic needles ({args.cases} cases per task), KL over {args.kl_tokens} "
          f"teacher-forced tokens of held-out prose after the context; budget = tokens per KV head on average")
    print(render(header, rows))


if __name__ == "__main__":
    main()
