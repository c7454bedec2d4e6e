"""One process of the tensor-parallel fault test (``tests/test_parallel.py``): a fault on rank 1 only.

``torchrun --standalone --nproc-per-node 2 tests/tp_faults.py MODEL_DIR OUT_DIR`` runs, on a model split over two
ranks, a compression that fails on rank 1 (in a stage, then in an observation), a load whose rank-1 shard is
missing, and after each a working ``generate()``; it writes what each raised to ``OUT_DIR/faults{r}.json``. A rank
that hung would time the test out; one that aborted would exit non-zero.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from pydantic import Field

import kvpipe
from kvpipe.core.registry import Params, Stage, register
from kvpipe.errors import KVPipeError
from kvpipe.models import cache_arg

PROTECT = {"stage": "sinks_window", "params": {"sinks": 2, "window": 4}}
MASS = {"stage": "attention_mass", "params": {"window": 8}}


class FaultParams(Params):
    where: str = Field("compress", description="compress or observe")


@register("fault_on_rank_1", family="scoring")
class FaultOnRank1(Stage):
    """Raises on rank 1 only: in its compression step, or while observing a layer's attention."""

    Params = FaultParams
    writes = ("scores",)
    observes = True

    def observe(self, obs):
        if self.params.where == "observe" and obs.shards.rank == 1:
            raise KVPipeError("injected fault on rank 1 (observe)")
        return None

    def __call__(self, ctx):
        if ctx.shards.rank == 1:
            raise KVPipeError("injected fault on rank 1 (compress)")
        ctx.write(self, "scores", [torch.rand(view.valid.shape) for view in ctx.layers])


def spec(where: str) -> dict:
    # `global` pools the budget over ranks: rank 0 goes on into its collectives while rank 1 has failed
    return {"version": 1, "budget": {"keep": 0.4},
            "stages": [PROTECT, {"stage": "fault_on_rank_1", "params": {"where": where}}, "global", "topk"]}


def outcome(call) -> dict:
    try:
        call()
        return {"raised": None}
    except KVPipeError as err:
        return {"raised": type(err).__name__, "message": str(err)}


def main() -> None:
    from transformers import AutoModelForCausalLM

    model_dir, out = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    ids = torch.randint(2, 250, (1, 48), generator=torch.Generator().manual_seed(7))
    working = {"version": 1, "budget": {"keep": 0.4}, "stages": [PROTECT, MASS, "global", "topk"]}
    results = {}
    with torch.no_grad():
        for where in ("compress", "observe"):
            with kvpipe.build(spec(where)).attach(model):
                results[where] = outcome(lambda: model.generate(ids, max_new_tokens=3, do_sample=False))
            with kvpipe.build(working).attach(model):
                results[f"after {where}"] = model.generate(ids, max_new_tokens=3, do_sample=False)[0, 48:].tolist()
        path = os.path.join(out, "faulty.safetensors")
        with kvpipe.build(working).attach(model) as handle:
            cache = handle.cache()
            model(ids, **cache_arg(model, cache))
            kvpipe.save_cache(cache, path)
            torch.distributed.barrier()
            if int(os.environ["RANK"]) == 1:
                os.remove(os.path.join(out, "faulty.rank1-of-2.safetensors"))
            results["load"] = outcome(lambda: kvpipe.load_cache(path, model))
            results["after load"] = model.generate(ids, max_new_tokens=3, do_sample=False)[0, 48:].tolist()
    with open(os.path.join(out, f"faults{os.environ['RANK']}.json"), "w") as file:
        json.dump(results, file)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
