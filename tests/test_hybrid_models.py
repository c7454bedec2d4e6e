"""Models whose layers are not all full attention: sliding windows (Gemma 2/3, GPT-OSS, Mistral and Qwen2 with a
window) and linear attention (Qwen3-Next). kvpipe compresses the full-attention layers, keeps or quantizes the
windows, and leaves states alone; the windows' masks stay transformers' own."""
from __future__ import annotations

import inspect
import sys

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, cache_utils
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import kvpipe
from kvpipe import UnsupportedModelError
from kvpipe.runtime import adapters
from kvpipe.runtime.adapters import base_attention_function
from kvpipe.runtime.cache import KVPipeLayer
from kvpipe.runtime.layer_kinds import layer_kinds
from kvpipe.runtime.window_layer import QuantizedWindowLayer

from conftest import tiny_model
from hybrid_models import WINDOWED, deepseek_v3, hybrid_model

NOOP = {"version": 1, "stages": []}
# transformers 5.25 keeps linear-attention states in DynamicCache; older releases give Qwen3-Next a cache of its own
STATES_IN_DYNAMIC_CACHE = hasattr(cache_utils, "LinearAttentionLayer")


def refused_without_states(name: str, attach) -> bool:
    """On a transformers whose DynamicCache holds no linear-attention state, Qwen3-Next is refused (checked here)."""
    if name != "Qwen3NextForCausalLM" or STATES_IN_DYNAMIC_CACHE:
        return False
    with pytest.raises(UnsupportedModelError, match="keeps no state for linear_attention layers"):
        attach()
    return True


def quantizing(bits: int = 4, residual: int = 8, sliding: str = "quantize") -> dict:
    return {"version": 1, "layers": {"sliding": sliding},
            "stages": [{"stage": "quantize", "params": {"bits": bits, "group_size": 32, "residual": residual}}]}


def evicting(**budget) -> dict:
    return {"version": 1, "budget": budget, "stages": [
        {"stage": "sinks_window", "params": {"sinks": 2, "window": 8}}, "attention_mass", "uniform", "topk"]}


def step_logits(model, ids, cache, steps: int = 6) -> list[torch.Tensor]:
    """Prefill ``ids``, then ``steps`` one-token forwards (fixed tokens); the logits of each call."""
    out = [model(ids, past_key_values=cache).logits]
    for t in range(steps):
        out.append(model(torch.full((ids.shape[0], 1), 7 + t), past_key_values=cache).logits)
    return out


@pytest.mark.parametrize("name", WINDOWED + ["Qwen3NextForCausalLM"])
def test_noop_equals_the_models_own_cache_and_detach_restores_it(name, random_ids):
    model = hybrid_model(name, window=24)                 # prompts longer than the window: windows slide
    if refused_without_states(name, lambda: kvpipe.build(NOOP).attach(model)):
        return
    ids = random_ids(1, 40)
    reference = step_logits(model, ids, DynamicCache(config=model.config))
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    with kvpipe.build(NOOP).attach(model) as handle:
        attached = step_logits(model, ids, handle.cache())
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), generated)
    for ref, got in zip(reference, attached):
        assert torch.equal(ref, got)
    assert all(torch.equal(a, b) for a, b in zip(reference, step_logits(model, ids, DynamicCache(config=model.config))))


@pytest.mark.parametrize("name", WINDOWED + ["Qwen3NextForCausalLM"])
@pytest.mark.parametrize("pipeline", ["default", "int4", "value-aware-int4"])
def test_shipped_pipelines_compress_a_600_token_prompt_and_detach(name, pipeline, random_ids):
    """With the families' real windows: the quantizing pipelines shrink the whole cache (windows and states
    included) by at least 1.3x; no pipeline grows it. A model with only windows refuses eviction, naming why."""
    model = hybrid_model(name)
    if refused_without_states(name, lambda: kvpipe.build(pipeline).attach(model)):
        return
    ids = random_ids(1, 600)
    before = model.generate(ids, max_new_tokens=3, do_sample=False)
    if name == "MistralForCausalLM" and pipeline != "int4":
        with pytest.raises(UnsupportedModelError, match="no full-attention layer"):
            kvpipe.build(pipeline).attach(model)
        return
    with kvpipe.build(pipeline).attach(model) as handle:
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        stats = handle.stats()
    assert out.shape == (1, 603)
    assert stats.kv_bytes <= stats.kv_bytes_full
    assert sum(stats.kv_bytes_by_kind.values()) == stats.kv_bytes
    if pipeline != "default" and name != "Qwen3NextForCausalLM":     # Qwen3-Next's states are most of its cache
        assert stats.compression_ratio >= 1.3, stats.kv_bytes_by_kind
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), before)


def test_windows_are_quantized_when_long_and_kept_when_short():
    long, short = hybrid_model("Gemma3ForCausalLM"), hybrid_model("GptOssForCausalLM")
    with kvpipe.build("int4").attach(long) as handle:
        kinds = {type(layer) for layer in handle.cache().layers}
    assert kinds == {KVPipeLayer, QuantizedWindowLayer}             # 1024-token windows: quantized (auto)
    with kvpipe.build("int4").attach(short) as handle:
        kinds = {type(layer) for layer in handle.cache().layers}
    assert kinds == {KVPipeLayer, DynamicSlidingWindowLayer}        # 128: not worth it, kept
    with kvpipe.build(quantizing(sliding="keep")).attach(long) as handle:
        assert not any(isinstance(layer, QuantizedWindowLayer) for layer in handle.cache().layers)


@pytest.mark.parametrize("name, attn", [("Qwen2ForCausalLM", "sdpa"), ("GptOssForCausalLM", "eager"),
                                        ("Gemma2ForCausalLM", "eager")])
def test_eviction_on_full_layers_equals_masking_the_models_own_cache(name, attn, random_ids):
    """The compressed full-attention layers compute what the model's own cache computes with the evicted slots
    masked out, and the windows stay exactly the model's (GPT-OSS: its attention sinks included)."""
    model = hybrid_model(name, window=24, attn=attn)
    ids = random_ids(1, 80)
    with kvpipe.build(evicting(keep=0.4)).attach(model) as handle:
        cache = handle.cache()
        compressed = step_logits(model, ids, cache, steps=3)
    kept = {index: layer.store.padded()[2][0] for index, layer in enumerate(cache.layers)
            if isinstance(layer, KVPipeLayer)}                       # [Hkv, width] positions, -1 unused
    assert kept and all(isinstance(cache.layers[i], DynamicSlidingWindowLayer)
                        for i in range(len(cache.layers)) if i not in kept)
    base = base_attention_function(attn, model.model)                   # HF's sdpa, or the model's own eager

    def masked(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1 and module.layer_idx in kept:        # decode over a full layer: mask the evicted
            allowed = torch.ones(key.shape[:3], dtype=torch.bool)
            allowed[..., :ids.shape[1]] = False
            for head, positions in enumerate(kept[module.layer_idx]):
                allowed[0, head, positions[positions >= 0].long()] = True
            allowed = allowed.repeat_interleave(query.shape[1] // key.shape[1], dim=1)[:, :, None, :]
            attention_mask = allowed if attn == "sdpa" else torch.zeros(allowed.shape).masked_fill(
                ~allowed, torch.finfo(torch.float32).min)
        return base(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_masked_hybrid", masked)
    AttentionMaskInterface.register("test_masked_hybrid", sdpa_mask if attn == "sdpa" else eager_mask)
    model.set_attn_implementation("test_masked_hybrid")
    try:
        reference = step_logits(model, ids, DynamicCache(config=model.config), steps=3)
    finally:
        model.set_attn_implementation(attn)
    for ref, got in zip(reference[1:], compressed[1:]):
        ulp = torch.finfo(ref.dtype).eps * ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=0, atol=32 * ulp)   # as test_attach's full-model check


def test_a_quantized_window_behaves_as_transformers_window_up_to_its_rounding():
    """Same lengths and mask sizes as ``DynamicSlidingWindowLayer`` at every step; the newest ``residual``
    tokens exact, older ones within 8-bit rounding; never more than the window and a page of older tokens."""
    from kvpipe.stages.quantize import Quantize, QuantizeParams

    window, group, residual = 40, 32, 8
    quant = Quantize(QuantizeParams(bits=8, group_size=group, residual=residual)).storage(16)
    ours, theirs = QuantizedWindowLayer(window, quant), DynamicSlidingWindowLayer(sliding_window=window)
    generator = torch.Generator().manual_seed(0)
    takes_positions = "cache_position" in inspect.signature(theirs.get_mask_sizes).parameters
    for step, length in enumerate([70, 1, 1, 5, *[1] * 40, 33]):
        keys, values = (torch.randn(2, 2, length, 16, generator=generator) for _ in range(2))
        seen = theirs.get_seq_length()
        argument = torch.arange(seen, seen + length) if takes_positions else length       # transformers < 5.3
        assert ours.get_mask_sizes(argument) == theirs.get_mask_sizes(argument)
        got, want = ours.update(keys, values), theirs.update(keys, values)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert torch.equal(g[..., -residual - length:, :], w[..., -residual - length:, :]) or step == 0
            scale = w.abs().amax().item()
            torch.testing.assert_close(g, w, rtol=0, atol=scale / 64)     # 8 bits over a group's range
        held = len(ours.pages) * group + ours.keys.shape[-2]
        assert held <= window - 1 + group - 1 + residual
        assert ours.nbytes <= 2 * 2 * 2 * held * 16 * 4                  # no more than the fp32 tokens it holds
    assert ours.get_seq_length() == theirs.get_seq_length()


def test_a_quantized_window_reorders_rows_and_forks_apart(random_ids):
    model = hybrid_model("MistralForCausalLM", window=48)
    ids = random_ids(2, 90)
    with kvpipe.build(quantizing(bits=8)).attach(model) as handle:
        cache = handle.cache()
        model(ids, past_key_values=cache)
        twin = cache.fork()
        model(torch.tensor([[5], [6]]), past_key_values=twin)
        assert cache.get_seq_length() == 90 and twin.get_seq_length() == 91
        layer = cache.layers[0]
        keys, _ = layer.held()
        layer.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(layer.held()[0], keys.flip(0))
        stats = handle.stats(cache)
    assert stats.kv_bytes_by_kind.keys() == {"window"} and stats.compression_ratio > 1.3


def test_a_bytes_budget_counts_the_windows():
    """``bytes`` is a fraction of the whole cache as transformers holds it: kept windows take their share first,
    the full-attention layers get the rest."""
    model = hybrid_model("GptOssForCausalLM")
    ids = torch.randint(2, 255, (1, 600), generator=torch.Generator().manual_seed(1))
    with kvpipe.build(evicting(bytes=0.5)).attach(model) as handle:
        model(ids)
        stats = handle.stats()
    assert stats.budget_met and stats.kv_bytes <= 0.5 * stats.kv_bytes_full
    assert stats.kv_bytes >= 0.45 * stats.kv_bytes_full                  # the budget is spent, not wasted
    assert stats.kept_tokens.shape[0] == 2                               # the two full-attention layers


def test_models_without_anything_kvpipe_can_compress_are_refused_naming_why():
    windows_only = hybrid_model("MistralForCausalLM", window=48)
    with pytest.raises(UnsupportedModelError, match="too short for quantization.*sliding: quantize"):
        kvpipe.build("int4").attach(windows_only)
    with pytest.raises(UnsupportedModelError, match="no full-attention layer.*eviction does not apply"):
        kvpipe.build("default").attach(windows_only)
    model = hybrid_model("Qwen2ForCausalLM")
    model.config.layer_types = ["full_attention", "hybrid", "full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedModelError, match="1 hybrid layers out of 4: hybrid layers keep"):
        kvpipe.build("int4").attach(model)
    assert getattr(model, "_kvpipe_session", None) is None


def test_attention_sinks_refuse_the_fused_decode_kernel(monkeypatch):
    import kvpipe.runtime.attach as attach

    monkeypatch.setattr(attach, "resolve_backend", lambda *args: "triton")
    with pytest.raises(UnsupportedModelError, match="attention sinks.*backend: torch"):
        kvpipe.build("int4").attach(hybrid_model("GptOssForCausalLM"))


def test_sliding_quantize_needs_a_quantize_stage():
    with pytest.raises(kvpipe.SpecError, match="layers.sliding.*quantize stage"):
        kvpipe.build({"version": 1, "layers": {"sliding": "quantize"}, "stages": []})


# the docs' table rows, by their first column
ROWS = {"llama": lambda: tiny_model("llama"), "qwen2": lambda: tiny_model("qwen2"),
        "qwen3": lambda: tiny_model("qwen3"), "mistral": lambda: tiny_model("mistral", sliding_window=None),
        "gemma2": lambda: hybrid_model("Gemma2ForCausalLM"), "gemma3": lambda: hybrid_model("Gemma3ForCausalLM"),
        "gpt-oss": lambda: hybrid_model("GptOssForCausalLM"),
        "mistral-window": lambda: hybrid_model("MistralForCausalLM"),
        "qwen2-window": lambda: hybrid_model("Qwen2ForCausalLM"),
        "qwen3-next": lambda: hybrid_model("Qwen3NextForCausalLM"), "deepseek-v3": deepseek_v3}


def docs_table() -> dict[str, list[str]]:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "architectures.md").read_text()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| `")]
    return {row[0].strip("`"): row for row in cells}


def test_the_docs_table_lists_every_family_tested_here():
    assert set(docs_table()) == set(ROWS)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_each_docs_table_row_is_what_kvpipe_does(row):
    """The layer kinds kvpipe reads and whether ``int4`` attaches and compresses, as the table says."""
    _, _, kinds, _, status = docs_table()[row]
    model = ROWS[row]()
    if refused_without_states(type(model).__name__, lambda: kvpipe.build("int4").attach(model)):
        return
    if status == "refused":
        with pytest.raises(UnsupportedModelError):
            kvpipe.build("int4").attach(model)
        return
    assert {kind.type for kind in layer_kinds(model)} == set(kinds.split(", "))
    ids = torch.randint(2, 100, (1, 300), generator=torch.Generator().manual_seed(0))
    with kvpipe.build("int4").attach(model) as handle:
        model(ids)
        assert handle.stats().compression_ratio > 1.0


@pytest.mark.parametrize("name", ["Gemma3ForCausalLM", "GptOssForCausalLM"])
def test_rope_tables_rotate_as_the_models_own_rotary_embedding(name):
    """Stages that rotate queries (expected_attention) read the full layers' rotary embedding in HF's rotate-half
    form over the whole head: it must rotate exactly as the model does (Gemma 3: the full layers' embedding,
    GPT-OSS: its half-width tables)."""
    model = hybrid_model(name)
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    query = torch.randn(1, 4, 5, 16)
    positions = torch.arange(100, 105)[None]
    cos, sin = adapters.rope_tables(model)(query, positions)
    ours = query * cos[:, None] + torch.cat([-query[..., 8:], query[..., :8]], -1) * sin[:, None]
    rotary = model.model.rotary_emb
    own = rotary(query, positions, "full_attention") if name == "Gemma3ForCausalLM" else rotary(query, positions)
    torch.testing.assert_close(ours, module.apply_rotary_pos_emb(query, query, *own)[0], rtol=1e-6, atol=1e-6)
    with kvpipe.build("expected-attention").attach(model) as handle:
        model(torch.randint(2, 250, (1, 300)))
        assert handle.stats().compression_ratio > 1.0


def test_a_partial_rotary_embedding_is_refused_by_stages_that_rotate_queries():
    model = hybrid_model("Qwen3NextForCausalLM")
    if refused_without_states("Qwen3NextForCausalLM", lambda: kvpipe.build("expected-attention").attach(model)):
        return
    with kvpipe.build("expected-attention").attach(model):
        with pytest.raises(UnsupportedModelError, match="rotates 4 of each head's 16 channels"):
            model(torch.randint(2, 250, (1, 300)))


def test_a_left_padded_batch_matches_each_prompt_alone(random_ids):
    """Padding reaches the windows through transformers' sliding mask and the full layers through kvpipe's: each
    row of a left-padded batch generates what it generates alone (eviction and quantized windows included)."""
    model = hybrid_model("Qwen2ForCausalLM", window=48)
    # padding of one page (32 tokens): the short row's pages hold the tokens they hold alone, so its quantized
    # values are bit-identical to its own
    long, short = random_ids(1, 120), random_ids(1, 88)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 32, dtype=torch.long), short], -1)])
    mask = torch.ones_like(batch)
    mask[1, :32] = 0
    pipeline = {**evicting(keep=0.5), "layers": {"sliding": "quantize"}}
    pipeline["stages"] = [*pipeline["stages"], {"stage": "quantize", "params": {"bits": 4, "group_size": 32,
                                                                                "residual": 16}}]
    with kvpipe.build(pipeline).attach(model) as handle:
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert any(isinstance(layer, QuantizedWindowLayer) for layer in handle.session.last_cache.layers)
        alone_long = model.generate(long, max_new_tokens=6, do_sample=False)
        alone_short = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0, 120:], alone_long[0, 120:])
    assert torch.equal(together[1, 120:], alone_short[0, 88:])
