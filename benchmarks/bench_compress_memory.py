"""Peak memory of a compressing prefill, per shipped pipeline, against the full cache's prefill on the same prompt.

Compression runs after the prefill forward, while the full cache of that forward is still held: scoring and
storing must not need more memory than the forward itself, or a prompt that fits with the full cache fails
when compressed. The peak is what the allocator held at its highest during one ``model(ids)`` call (the
weights excluded): on CUDA ``torch.cuda.max_memory_allocated``; on the CPU torch's profiler memory timeline
(slow: one pass per pipeline). Random weights of a real shape; speed and memory do not depend on the weights.

    python benchmarks/bench_compress_memory.py                                  # all shipped pipelines, CPU
    python benchmarks/bench_compress_memory.py value-aware-int4 int4 --context 8192 --layers 16 --device cuda
    python benchmarks/bench_compress_memory.py agnostic agnostic-gates --model smollm2-135m --context 2048

``--model smollm2-135m`` (the embedded model) measures what needs its tokenizer or its trained gates.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from tqdm.auto import tqdm

import kvpipe
from kvpipe.core import shipped
from kvpipe.core.table import human_bytes, render
from kvpipe.errors import KVPipeError

# Llama-3.2-1B's attention and MLP shape (the layer count is an argument)
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             rope_theta=500000.0)


def random_model(layers: int, context: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, num_hidden_layers=layers, max_position_embeddings=context + 16,
                         attn_implementation="sdpa", **SHAPE)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def peak_bytes(run, device: torch.device) -> int:
    """Most bytes allocated during ``run()`` beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as file:
            _, sizes = json.load(file)
    # a row per time: [0, parameters, optimizer state, inputs, temporaries, activations, gradients, autograd, other]
    return max(sum(at) - at[1] for at in sizes) if sizes else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="*", help="shipped names or YAML files (default: every shipped one)")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the Llama-3.2-1B-shaped model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", help="a model kvpipe.models.load knows (default: the random Llama-3.2-1B shape)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokenizer = None
    if args.model:
        from kvpipe.models import load

        model, tokenizer = load(args.model)
        model.to(device)
        shape = f"{args.model}, {model.config.num_hidden_layers} layers"
    else:
        model = random_model(args.layers, args.context, device)
        shape = f"Llama-3.2-1B shape with {args.layers} layers, random weights"
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab - 1, (1, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)

    def prefill():
        with torch.inference_mode():
            model(ids, attention_mask=mask, use_cache=True)

    full = peak_bytes(prefill, device)
    rows = [["full cache", human_bytes(full), 1.0]]
    for name in tqdm(args.pipelines or shipped.names(), desc="pipelines"):
        try:
            with kvpipe.build(name).attach(model, tokenizer=tokenizer):
                peak = peak_bytes(prefill, device)
        except KVPipeError as why:       # gates trained for another model, a probe prompt needing a tokenizer
            rows.append([name, "not measured", str(why).split(", but")[0][:90]])
            continue
        rows.append([name, human_bytes(peak), peak / full])
    print(f"{args.context}-token prefill, {shape}, {device.type}; peak beyond the weights")
    print(render(["pipeline", "peak", "x full cache"], rows))


if __name__ == "__main__":
    main()
