"""The device part of a decode step over a compressed layer traces as one graph that is compiled once.

A CUDA graph replays tensor operations only; the host's bookkeeping (how many tokens a tail holds, when to flush)
stays outside. ``torch.compile(fullgraph=True)`` is the CPU proxy for "capturable": it refuses a graph break
(a host read, data-dependent control flow, an untraceable call), and a counting backend shows whether a step
recompiles. The step below is kvpipe's own path for one layer, as ``update`` and the attention function run it: the
new token written into the static tail on the device, the store read with the tail (quantized pages dequantized
into the workspace), the mask from the tail's device-side length, and SDPA. Why the whole model's forward is not
compiled here: the attach's forward hooks do host-side work each forward (adopting the cache, timing, triggers);
a captured step runs between them, which is what this test traces.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvpipe.runtime.attention import static_tail_mask
from kvpipe.runtime.tail import StaticTail

from conftest import left_padded_batch, shipped_pipeline, tiny_model

STEPS = 32


@pytest.mark.parametrize("name", ["int4", "default", "value-aware-int4"])
def test_a_decode_step_compiles_once_over_32_steps(name, tmp_path):
    model = tiny_model()
    ids, mask = left_padded_batch(50)
    with shipped_pipeline(name, tmp_path, backend="torch").attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, attention_mask=mask, past_key_values=cache)
        layer = cache.layers[0]
        batch, heads, _, dim = layer.keys.shape
        q_heads = model.config.num_attention_heads
        empty = layer.keys[..., :0, :]
        tails = [StaticTail(empty, empty, 64) for _ in range(2)]      # one compiled, one eager: same inputs
        generator = torch.Generator().manual_seed(7)

        def step(tail, query, key, value):
            tail.append_on_device(key, value)
            keys, values = layer.store.attend(tail.keys, tail.values, layer.storage.workspace)
            layer._static = tail                     # the mask reads the layer's tail (as attention does)
            attn_mask = static_tail_mask(layer, query, additive=False)
            return F.scaled_dot_product_attention(query, keys.repeat_interleave(q_heads // heads, 1),
                                                  values.repeat_interleave(q_heads // heads, 1), attn_mask=attn_mask)

        graphs = []

        def counting(graph, example_inputs):
            graphs.append(graph)
            return graph.forward

        compiled = torch.compile(step, backend=counting, fullgraph=True, dynamic=False)
        for _ in range(STEPS):
            query = torch.randn(batch, q_heads, 1, dim, generator=generator)
            key, value = (torch.randn(batch, heads, 1, dim, generator=generator) for _ in range(2))
            want = step(tails[1], query, key, value)     # first: a store reads its own shape once, eagerly
            got = compiled(tails[0], query, key, value)
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
        assert len(graphs) == 1, f"compiled {len(graphs)} times over {STEPS} steps"
        assert int(tails[0].device_length) == STEPS
