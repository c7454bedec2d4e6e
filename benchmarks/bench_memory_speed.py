"""Full cache vs a pipeline on the embedded model: memory held and speed, per context length.

Same prompts, greedy decoding, measured one after the other in this process. On CPU at 135M
parameters decoding is dominated by the MLP and the LM head, so expect memory, not speed, to move.
"""
from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import kvpipe
from kvpipe.core.table import human_bytes, render
from kvpipe.eval.run import prefill_then_decode as measure
from kvpipe.eval.tasks import make_cases
from kvpipe.models import load
from kvpipe.runtime.cache import cache_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="pipelines/default.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    pipeline = kvpipe.build(args.pipeline)
    model, tokenizer = load(args.model)
    rows = []
    for context in tqdm(args.contexts, desc="contexts"):
        ids = make_cases(tokenizer, context, 1, seed=context)[0].ids
        full_cache = DynamicCache(config=model.config)
        full_prefill, full_decode = measure(model, ids, full_cache, args.new_tokens)
        full_bytes = cache_bytes(full_cache)
        with pipeline.attach(model) as handle:
            cache = handle.cache()
            prefill, decode = measure(model, ids, cache, args.new_tokens)
            held = handle.stats(cache)["kv_bytes"]
        rows.append([ids.shape[1], human_bytes(full_bytes), human_bytes(held), full_bytes / held,
                     full_prefill, prefill, full_decode, decode, decode / full_decode])
    print(f"pipeline {pipeline}; {args.new_tokens} new tokens; torch threads {torch.get_num_threads()}")
    print(render(["tokens", "full bytes", "pipeline bytes", "compression", "full prefill s", "pipeline prefill s",
                  "full tok/s", "pipeline tok/s", "speed ratio"], rows))


if __name__ == "__main__":
    main()
