"""One process of the tensor-parallel test (``tests/test_parallel.py``), and the one-process run it is compared with.

``torchrun --standalone --nproc-per-node 2 tests/tp_worker.py MODEL_DIR GATES OUT_DIR`` loads the model with
transformers' tensor parallelism (gloo on the CPU), runs every scenario and writes ``OUT_DIR/rank{r}.json``.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import kvpipe
from kvpipe.eval.protocol import Protocol
from kvpipe.models import cache_arg
from kvpipe.runtime.cache import cache_bytes

PROTECT = {"stage": "sinks_window", "params": {"sinks": 2, "window": 4}}
MASS = {"stage": "attention_mass", "params": {"window": 8}}


def scenarios(gates: str) -> dict[str, dict]:
    """Pipelines whose allocation needs nothing, or everything, of the other ranks."""
    def spec(*stages, budget=None):
        return {"version": 1, "budget": budget or {"keep": 0.4}, "stages": list(stages)}
    return {
        "noop": {"version": 1, "stages": []},
        "uniform": spec(PROTECT, MASS, "uniform", "topk"),
        "adaptive_heads": spec(PROTECT, MASS, "adaptive_heads", "topk"),
        "pyramid": spec(PROTECT, MASS, {"stage": "pyramid", "params": {"beta": 4}}, "topk"),
        "global-zscore": spec(PROTECT, MASS, "global", "topk"),
        "global-rank": spec(PROTECT, MASS, {"stage": "global", "params": {"calibration": "rank"}}, "topk"),
        "global-critical": spec(PROTECT, {"stage": "critical", "params": {"window": 8}}, "global", "topk"),
        "global-tova": spec(PROTECT, "tova", {"stage": "global", "params": {"calibration": "none"}}, "topk"),
        "global-gates": spec(PROTECT, {"stage": "retention_gates", "params": {"gates": gates}},
                             {"stage": "global", "params": {"calibration": "none", "floor": 0.0}}, "topk"),
        "global-int4": spec(PROTECT, MASS, "global", {"stage": "quantize", "params": {"residual": 8,
                                                                                      "group_size": 32}},
                            "topk", budget={"bytes": 0.25}),
    }


def kept(cache, first_head: int) -> list[list[int]]:
    """Sorted ``[layer, model head, position]`` of every slot this process's cache holds (row 0)."""
    held = []
    for index, layer in enumerate(cache.layers):
        view = layer.view(None)
        for head in range(view.valid.shape[1]):
            held += [[index, first_head + head, int(p)] for p in view.positions[0, head][view.valid[0, head]]]
    return sorted(held)


def run(model, gates: str) -> dict:
    """Per scenario: the greedy tokens, the kept slots after prefill and ``stats()``; and the bytes of a full
    cache as the benchmark protocol measures them."""
    from transformers import DynamicCache

    ids = torch.randint(2, 250, (1, 48), generator=torch.Generator().manual_seed(7))
    full = DynamicCache(config=model.config)
    model(ids, **cache_arg(model, full))
    results: dict = {"full_cache_bytes": Protocol(model, None).model_wide(cache_bytes(full))}
    for name, spec in scenarios(gates).items():
        with kvpipe.build(spec).attach(model) as handle:
            cache = handle.cache()
            model(ids, **cache_arg(model, cache))
            stats = handle.stats()
            local_heads = cache.layers[0].keys.shape[1]
            tokens = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:].tolist()
        timeless = {key: value for key, value in stats.items() if "seconds" not in key and key != "probe_vs_forward"}
        results[name] = {"tokens": tokens, "kept": kept(cache, cache.shards.rank * local_heads),
                         "stats": {key: (value.tolist() if torch.is_tensor(value) else value)
                                   for key, value in timeless.items()}}
    return results


def saved_and_loaded(model, gates: str, path: str) -> bool:
    """Whether a compressed (int4) cache saved and loaded again answers the next tokens exactly as in memory."""
    ids = torch.randint(2, 250, (1, 48), generator=torch.Generator().manual_seed(8))
    more = torch.randint(2, 250, (1, 3), generator=torch.Generator().manual_seed(9))
    with kvpipe.build(scenarios(gates)["global-int4"]).attach(model) as handle:
        cache = handle.cache()
        model(ids, **cache_arg(model, cache))
        kvpipe.save_cache(cache, path)
        loaded = kvpipe.load_cache(path, model)
        return torch.equal(model(more, **cache_arg(model, cache)).logits,
                           model(more, **cache_arg(model, loaded)).logits)


def main() -> None:
    from transformers import AutoModelForCausalLM

    model_dir, gates, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    with torch.no_grad():
        results = run(model, gates)
        results["saved_and_loaded"] = saved_and_loaded(model, gates, os.path.join(out, "cache.safetensors"))
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as file:
        json.dump(results, file)
    # closed before exit: a gloo group torn down by the interpreter's exit can abort the process (seen on 5.2)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
