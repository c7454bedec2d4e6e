"""What a compression sends between tensor-parallel ranks, per pipeline and context length, on the embedded model.

Run under ``torchrun`` (SmolLM2-135M has 3 KV heads, so 3 ranks on the CPU):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 3 benchmarks/bench_tp_traffic.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 3 benchmarks/bench_tp_traffic.py \\
        default global-critical --context 512 2048 4096

Each pipeline compresses one prose context of each length, prefilled in one forward (one compression), and
``handle.stats()`` gives the bytes every rank sent (``collective_bytes``, all ranks together) and the bytes the
compressed cache holds. The last column is what the same agreement would send if the ranks exchanged every
score instead (4 bytes per cached token, head and layer): the pooled budgets' histograms do not grow with the
context; a per-head allocator sends nothing.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import kvpipe
from kvpipe.core.table import human_bytes, render
from kvpipe.eval.tasks import paragraphs
from kvpipe.models import launched_by_torchrun, load

PIPELINES = ["default", "snapkv-adaptive", "global-critical", "learned-global", "value-aware-int4"]


def prose(tokenizer, tokens: int) -> torch.Tensor:
    """``long [1, tokens]`` of Python-docs prose."""
    ids = tokenizer("\n".join(paragraphs()[:2000]), return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise SystemExit(f"the prose has {ids.shape[1]} tokens, fewer than --context {tokens}")
    return ids[:, :tokens]


def traffic(pipeline, model, tokenizer, ids: torch.Tensor) -> dict:
    """``handle.stats()`` after one prefill of ``ids`` with ``pipeline`` attached (a collective: every rank)."""
    with pipeline.attach(model, tokenizer) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, past_key_values=cache)
        return handle.stats(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="*", default=PIPELINES, help="shipped names or YAML paths "
                        f"(default: {' '.join(PIPELINES)})")
    parser.add_argument("--context", type=int, nargs="+", default=[512, 2048], help="tokens (default 512 2048)")
    args = parser.parse_args()
    model, tokenizer = load(tensor_parallel=launched_by_torchrun()[1] > 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = model.config
    rows = []
    for name in args.pipelines:
        pipeline = kvpipe.build(name)
        for tokens in args.context:
            stats = traffic(pipeline, model, tokenizer, prose(tokenizer, tokens))
            scores = 4 * tokens * config.num_key_value_heads * config.num_hidden_layers
            rows.append([name, tokens, world, human_bytes(stats["kv_bytes_full"]), human_bytes(stats["kv_bytes"]),
                         f"{stats['collective_bytes']:,}", human_bytes(scores)])
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(render(["pipeline", "tokens", "ranks", "full cache", "compressed", "sent (bytes, all ranks)",
                      "exchanging scores would send"], rows))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
