"""What compressing a context costs, per pipeline, side by side in one process on the embedded model.

For each pipeline and each of ``--repeats`` prose contexts of ``--context`` tokens: one prefill with the
pipeline attached, and from ``handle.stats()`` the time of the forward itself, of the probe (the reconstruction
re-reading, 0 for other pipelines) and of the compression; then everything after the forward (probe +
compression) as a multiple of the plain forward, and each pipeline's median against the first one's.

Examples:
    python benchmarks/bench_compress_time.py agnostic agnostic-gates learned-global
    python benchmarks/bench_compress_time.py agnostic agnostic-gates --context 4096 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics

import torch
from tqdm.auto import tqdm

import kvpipe
from kvpipe.core.table import render
from kvpipe.eval.tasks import paragraphs
from kvpipe.models import load


def contexts(tokenizer, tokens: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of Python-docs prose, ``long [1, tokens]`` each, from spread-out places."""
    prose = paragraphs()
    step = len(prose) // count
    return [tokenizer("\n".join(prose[i * step:i * step + 400]), return_tensors="pt").input_ids[:, :tokens]
            for i in range(count)]


def timings(pipeline, model, tokenizer, ids: torch.Tensor) -> tuple[float, float, float]:
    """``(forward s, probe s, compress s)`` of one prefill of ``ids`` with ``pipeline`` attached."""
    with pipeline.attach(model, tokenizer) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, past_key_values=cache)
        stats = handle.stats(cache)
    return stats["compressing_forward_seconds"], stats["probe_seconds"], stats["compress_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="shipped names or YAML paths; the first is the reference")
    parser.add_argument("--context", type=int, default=2048, help="tokens per context (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="contexts per pipeline (default 3)")
    args = parser.parse_args()
    model, tokenizer = load()
    texts = contexts(tokenizer, args.context, args.repeats)
    timings(kvpipe.build(args.pipelines[0]), model, tokenizer, texts[0][:, :256])      # warm-up
    rows, after = [], {}
    for name in tqdm(args.pipelines, desc="pipelines"):
        runs = [timings(kvpipe.build(name), model, tokenizer, ids) for ids in texts]
        forward, probe, compress = (statistics.median(column) for column in zip(*runs))
        after[name] = probe + compress
        rows.append([name, forward, probe, compress, (probe + compress) / forward])
    reference = after[args.pipelines[0]]
    rows = [row + [reference / after[row[0]]] for row in rows]
    print(f"{args.context} tokens, median of {args.repeats} contexts, {torch.get_num_threads()} threads")
    print(render(["pipeline", "forward s", "probe s", "compress s", "after forward / forward",
                  f"speed-up of compression vs {args.pipelines[0]}"], rows))


if __name__ == "__main__":
    main()
