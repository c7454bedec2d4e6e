"""Rotated low-bit codes on the embedded model: KL to the full cache with and without a Hadamard rotation.

Every row compresses the same context of held-out documentation prose (the main suite's fidelity text), then
teacher-forces the same continuation; ``quantize`` settings differ only in ``rotate``. Side by side in one run.

    python benchmarks/bench_rotation.py                        # int2 (groups of 32 and 64) and int4, 2k context
    python benchmarks/bench_rotation.py --bits 2 --context 1024
"""
from __future__ import annotations

import argparse

from tqdm.auto import tqdm

import kvpipe
from kvpipe.core.table import render
from kvpipe.eval.bench import fidelity_ids
from kvpipe.eval.fidelity import fidelity
from kvpipe.models import load


def quantizing(bits: int, group: int, rotate: str) -> kvpipe.Pipeline:
    return kvpipe.build({"version": 1, "name": f"int{bits} g{group} {rotate}", "backend": "torch", "stages": [
        {"stage": "quantize", "params": {"bits": bits, "group_size": group, "residual": 128, "rotate": rotate}}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4], choices=[2, 4, 8])
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64], choices=[32, 64, 128],
                        help="tokens per key group (= page) tried for each bit width")
    parser.add_argument("--context", type=int, default=2048, help="tokens compressed")
    parser.add_argument("--continuation", type=int, default=256, help="tokens teacher-forced after it")
    args = parser.parse_args()
    model, tokenizer = load("smollm2-135m")
    ids = fidelity_ids(tokenizer)
    context, continuation = ids[:, :args.context], ids[:, args.context:args.context + args.continuation]
    rows = []
    cases = [(bits, group) for bits in args.bits for group in args.groups]
    for bits, group in tqdm(cases, desc="settings"):
        plain, rotated = (fidelity(model, quantizing(bits, group, rotate), context, continuation)
                          for rotate in ("none", "hadamard"))
        rows.append([f"int{bits}", group, f"{plain.kl:.4f}", f"{rotated.kl:.4f}", f"{rotated.kl / plain.kl:.2f}",
                     f"{plain.ppl:.2f}", f"{rotated.ppl:.2f}", f"{plain.ppl_full:.2f}"])
    print(render(["codes", "group", "KL plain", "KL rotated", "ratio", "ppl plain", "ppl rotated", "ppl full"],
                 rows))


if __name__ == "__main__":
    main()
