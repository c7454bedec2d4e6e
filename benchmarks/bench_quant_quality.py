"""Quantized KV caches on the embedded model: kvpipe's quantize stage next to transformers' QuantizedCache.

For every cache, in one process, on the same prompts:

* KL divergence of next-token distributions to the full cache, and perplexity, on real prose (the Python
  documentation): a context is cached, then a continuation is teacher-forced;
* needle accuracy at a given context length (the context is cached before the question is seen);
* KV bytes held after the needle prompt (real tensor storage) and that as a fraction of a bf16 cache;
* decode tokens/s after the prompt, and its ratio to transformers' QuantizedCache at the same bits.

Examples:
    python benchmarks/bench_quant_quality.py                     # everything, 2k context, 6 needle cases
    python benchmarks/bench_quant_quality.py --bits 4 --cases 3  # a quick look at 4 bits
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, QuantizedCache

import kvpipe
from kvpipe.core.table import human_bytes, render
from kvpipe.eval.contenders import held_bytes
from kvpipe.eval.fidelity import continuation_logits
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.run import prefill_then_decode
from kvpipe.eval.tasks import make_cases, paragraphs
from kvpipe.models import load


@dataclass(frozen=True)
class Contender:
    library: str          # "full", "kvpipe" or "transformers"
    method: str           # kvpipe: kivi / hqq / quanto; transformers: its backend
    bits: int = 16

    @property
    def label(self) -> str:
        return "full cache" if self.library == "full" else f"{self.library} {self.method} int{self.bits}"

    @contextlib.contextmanager
    def caches(self, model, group: int, residual: int):
        """Yields a function making a fresh cache of this kind (kvpipe attached for the duration)."""
        if self.library == "full":
            yield lambda: DynamicCache(config=model.config)
        elif self.library == "transformers":
            yield lambda: QuantizedCache(self.method, model.config, nbits=self.bits, q_group_size=group,
                                         residual_length=residual)
        else:
            pipeline = kvpipe.build({"version": 1, "name": self.label, "stages": [{"stage": "quantize", "params": {
                "method": self.method, "bits": self.bits, "group_size": group, "residual": residual}}]})
            with pipeline.attach(model) as handle:
                yield handle.cache


def contenders(bits: list[int], methods: list[str], peers: list[str]) -> list[Contender]:
    out = [Contender("full", "-")]
    for b in bits:
        out += [Contender("kvpipe", m, b) for m in methods if not (m == "quanto" and b == 8)]
        # transformers' quanto backend takes 2 and 4 bits only
        out += [Contender("transformers", p, b) for p in peers if not (p == "quanto" and b == 8)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2], choices=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["kivi", "hqq", "quanto"], help="kvpipe quantize methods")
    parser.add_argument("--peers", nargs="+", default=["quanto", "hqq"], help="transformers QuantizedCache backends")
    parser.add_argument("--group", type=int, default=64, help="group size for every cache (kvpipe and transformers)")
    parser.add_argument("--residual", type=int, default=128, help="full-precision window for every cache")
    parser.add_argument("--context", type=int, default=2048, help="needle context tokens")
    parser.add_argument("--cases", type=int, default=6, help="needle cases")
    parser.add_argument("--kl-context", type=int, default=1024, help="prose tokens cached before the KL continuation")
    parser.add_argument("--kl-tokens", type=int, default=256, help="teacher-forced continuation tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens timed per cache")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (the median is reported)")
    args = parser.parse_args()

    model, tokenizer = load()
    torch.manual_seed(0)
    prose = tokenizer("\n".join(paragraphs()[200:400]), return_tensors="pt").input_ids
    context, continuation = prose[:, :args.kl_context], prose[:, args.kl_context:args.kl_context + args.kl_tokens]
    cases = make_cases(tokenizer, args.context, args.cases)
    full_logits = None
    rows = []
    for contender in tqdm(contenders(args.bits, args.methods, args.peers), desc="caches"):
        with contender.caches(model, args.group, args.residual) as new_cache:
            logits = continuation_logits(model, context, continuation, new_cache())
            correct, held, held_16bit = 0, 0, 0
            for case in cases:
                cache = new_cache()
                text = Protocol(model, tokenizer).ask(case, cache).text
                correct += case.is_correct(text)
                held += held_bytes(cache)
                cfg = model.config
                held_16bit += (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cache.get_seq_length()
                               * cfg.head_dim * 2)
        full_logits = logits if full_logits is None else full_logits
        log_full, log_here = full_logits.log_softmax(-1), logits.log_softmax(-1)
        kl = float((log_full.exp() * (log_full - log_here)).sum(-1).mean())
        ppl = float((-log_here.gather(-1, continuation[0, :, None]).mean()).exp())
        rows.append([contender.label, kl, ppl, f"{correct}/{len(cases)}", human_bytes(held / len(cases)),
                     held / held_16bit])
    # Speed last, every cache once per round, rounds interleaved: a shared CPU drifts, medians of rounds do not.
    timings = {c: [] for c in contenders(args.bits, args.methods, args.peers)}
    for _ in tqdm(range(args.rounds), desc="decode speed rounds"):
        for contender in timings:
            with contender.caches(model, args.group, args.residual) as new_cache:
                timings[contender].append(prefill_then_decode(model, cases[0].ids, new_cache(), args.new_tokens)[1])
    speed = {c: statistics.median(t) for c, t in timings.items()}
    for row, tps in zip(rows, speed.values()):
        row.append(tps)
    print(f"SmolLM2-135M fp32 on {torch.get_num_threads()} CPU threads; group {args.group}, full-precision window "
          f"{args.residual}; KL over {args.kl_tokens} teacher-forced tokens after {args.kl_context} of prose; "
          f"needle {args.context} tokens x {args.cases} cases, context cached before the question; decode speed: "
          f"{args.new_tokens} tokens after the needle prompt, median of {args.rounds} interleaved rounds")
    print(render(["cache", "KL nats/token", "ppl", "needle", "KV bytes held", "x of bf16 cache",
                  "decode tok/s (median)"],
                 rows))
    ratios = [[f"int{c.bits}", p.method, speed[c] / speed[p]]
              for c in speed if c.library == "kvpipe" and c.method == "kivi"
              for p in speed if p.library == "transformers" and p.bits == c.bits]
    if ratios:
        print("decode speed, kvpipe kivi (torch path) / transformers QuantizedCache, same bits, same run")
        print(render(["bits", "transformers backend", "speed ratio"], ratios))


if __name__ == "__main__":
    main()
