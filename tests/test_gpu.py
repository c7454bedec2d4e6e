"""On a CUDA device (``pytest -m gpu``; skipped with the reason elsewhere): every shipped pipeline through
``generate()`` on a random-weight Llama-shaped model in bf16, and the memory the cache reports against the memory
CUDA says it holds. The CPU machine covers the same code with the device trap (``test_device_trap.py``)."""
from __future__ import annotations

import pytest
import torch

import kvpipe
from kvpipe.core.shipped import names

from conftest import shipped_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.cuda]


def llama_shaped(layers: int = 4, seed: int = 0):
    """A small Llama in bf16 on CUDA with real head geometry: 8 query heads, 2 KV heads, head_dim 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         attn_implementation="sdpa", initializer_range=0.2, pad_token_id=0, eos_token_id=None,
                         bos_token_id=1)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def model():
    return llama_shaped()


@pytest.mark.parametrize("name", names())
def test_every_shipped_pipeline_generates_on_cuda(model, name, tmp_path):
    pipeline = shipped_pipeline(name, tmp_path, gate_shape=(4, 2, 64))     # llama_shaped()'s layers and heads
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1000, (2, 700), generator=generator).cuda()
    mask = torch.ones_like(ids)
    mask[1, :50] = 0                                                       # left padding
    with pipeline.attach(model) as handle:
        assert handle.session.backend == ("torch" if pipeline.spec.backend == "torch" else "triton")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        stats = handle.stats()
    assert out.shape == (2, 708) and out.device.type == "cuda"
    assert stats["kv_bytes"] > 0
    if pipeline.compresses and name != "noop":
        assert stats["kv_bytes"] < stats["kv_bytes_full"], name


def test_fused_decode_is_as_accurate_as_the_torch_path_in_a_real_forward(model):
    """One decode step over a 4-bit cache, against the full bf16 cache: Triton's fused kernel must be no further
    from it than dequantize-then-SDPA (same stored codes). Both differ from the full cache by the quantization
    error; a wrong key, page or scale would add an O(1) error to the fused path only."""
    ids = torch.randint(2, 1000, (1, 1500), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        full = model(ids, use_cache=True).logits[:, -1].float()
    error = {}
    for backend in ("torch", "triton"):
        spec = kvpipe.build("int4").spec.model_dump(mode="python", exclude_none=True) | {"backend": backend}
        with kvpipe.build(spec).attach(model) as handle:
            cache = handle.cache()
            with torch.no_grad():
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                logits = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1].float()
        error[backend] = float((logits - full).norm() / full.norm())
    assert error["triton"] <= 1.5 * error["torch"] + 1e-2, error


def held_after_prefill(model, ids, pipeline=None) -> tuple[int, dict | None]:
    """CUDA memory still allocated after one prefill forward (logits dropped), and the handle's stats."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    handle = pipeline.attach(model) if pipeline is not None else None
    cache = handle.cache() if handle is not None else None
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    del out
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    stats = handle.stats(cache) if handle is not None else None
    if handle is not None:
        handle.detach()
    return held, stats


@pytest.mark.parametrize("name", ["default", "int4", "value-aware-int4"])
def test_cuda_memory_falls_by_what_stats_say(model, name):
    ids = torch.randint(2, 1000, (1, 4096), generator=torch.Generator().manual_seed(3)).cuda()
    full_held, _ = held_after_prefill(model, ids)
    held, stats = held_after_prefill(model, ids, kvpipe.build(name))
    # allocator blocks round every tensor up to 512 bytes; a layer holds about a dozen small index tensors
    slack = 0.01 * stats["kv_bytes"] + 64 * 512 * len(model.model.layers)
    assert abs(full_held - stats["kv_bytes_full"]) <= 0.01 * stats["kv_bytes_full"] + slack
    assert abs(held - stats["kv_bytes"]) <= slack, (held, stats["kv_bytes"])
    assert full_held - held >= 0.9 * (stats["kv_bytes_full"] - stats["kv_bytes"])
