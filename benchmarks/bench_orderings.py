"""Stage orderings at equal bytes: does "recover, then rank by value, then project coupled" win?

The same stages in different orders (or with one step left out), every pipeline under the same **byte**
budget, on needle tasks (single, multi-key, multi-value); plus quantize→evict against evict→quantize.
Prints one table (accuracy per order and task family, which order wins each) and draws a bar chart.

Examples:
    python benchmarks/bench_orderings.py                        # bytes 0.15, 2k context, 4 cases per task
    python benchmarks/bench_orderings.py --bytes 0.1 --context 4096 --cases 6 --plot orderings.png
"""
from __future__ import annotations

import argparse

from tqdm.auto import tqdm

import kvpipe
from kvpipe.models import load
from kvpipe.run import full_cache_correct, needle_accuracy
from kvpipe.table import human_bytes, render
from kvpipe.tasks import make_cases

PROTECT = {"stage": "sinks_window", "params": {"sinks": 4, "window": 64}}
VALUE = {"stage": "critical", "params": {"window": 64, "pool": 15}}
MASS = {"stage": "attention_mass", "params": {"window": 64, "pool": 15}}
RECOVER = {"stage": "recover_evidence", "params": {"window": 64, "coverage": 0.9, "max_share": 0.5}}
COUPLED = {"stage": "coupled_projection", "params": {"block": 16}}
INT4 = {"stage": "quantize", "params": {"bits": 4, "group_size": 128, "residual": 0}}
ALLOCATE = {"stage": "adaptive_heads", "params": {"floor": 0.2}}

ORDERS = {
    "recover -> value -> coupled": [PROTECT, RECOVER, VALUE, ALLOCATE, COUPLED],
    "value -> top-k (no recovery)": [PROTECT, VALUE, ALLOCATE, "topk"],
    "recover -> value -> top-k": [PROTECT, RECOVER, VALUE, ALLOCATE, "topk"],
    "value -> coupled (no recovery)": [PROTECT, VALUE, ALLOCATE, COUPLED],
    "attention mass -> top-k": [PROTECT, MASS, ALLOCATE, "topk"],
    "evict (value) -> quantize int4": [PROTECT, VALUE, ALLOCATE, "topk", INT4],
    "quantize int4 -> evict (value)": [INT4, PROTECT, VALUE, ALLOCATE, "topk"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=float, default=0.15, help="byte budget: fraction of the full cache's bytes")
    parser.add_argument("--kinds", nargs="+", default=["single", "multikey", "multivalue"])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--agnostic", action="store_true", help="compress before the question is seen")
    parser.add_argument("--plot", metavar="PNG", help="also draw accuracy per order and task to this file")
    args = parser.parse_args()

    model, tokenizer = load()
    pipelines = {name: kvpipe.build({"version": 1, "name": name, "budget": {"bytes": args.bytes}, "stages": stages})
                 for name, stages in ORDERS.items()}
    accuracy = {name: {} for name in ORDERS}
    rows = []
    for kind in args.kinds:
        prompts = make_cases(tokenizer, args.context, args.cases, seed=0, kind=kind)
        full = full_cache_correct(model, tokenizer, prompts, not args.agnostic)
        rows.append([kind, "full cache", f"{full}/{args.cases}", "-"])
        for name, pipeline in tqdm(pipelines.items(), desc=f"{kind} orders"):
            correct, held, _ = needle_accuracy(model, tokenizer, pipeline, prompts, not args.agnostic)
            accuracy[name][kind] = correct
            rows.append([kind, name, f"{correct}/{args.cases}", human_bytes(held)])
    winners = [[kind, ", ".join(n for n in ORDERS if accuracy[n][kind] == max(a[kind] for a in accuracy.values()))]
               for kind in args.kinds]
    protocol = "question-agnostic" if args.agnostic else "question-aware"
    print(f"orderings at bytes {args.bytes} of the full cache, {args.context}-token needles, {args.cases} cases per "
          f"task, {protocol}")
    print(render(["task", "order", "correct", "KV bytes held"], rows))
    print(render(["task", "winning order(s)"], winners))
    if args.plot:
        draw(accuracy, args.kinds, args.cases, args.plot, f"bytes {args.bytes}, {args.context} tokens")


def draw(accuracy: dict[str, dict[str, int]], kinds: list[str], cases: int, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(accuracy)
    for i, (name, per_kind) in enumerate(accuracy.items()):
        ax.bar([k + i * width for k in range(len(kinds))], [per_kind[kind] / cases for kind in kinds], width,
               label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("accuracy")
    ax.set_title(f"stage orderings at equal bytes ({title})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
