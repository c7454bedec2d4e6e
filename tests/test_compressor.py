"""A cache that stands alone and the compressor that runs a pipeline over it, with and without a model."""
from __future__ import annotations

import copy

import pytest
import torch

import kvpipe
from kvpipe.runtime.cache import KVPipeCache
from kvpipe.runtime.compressor import compress
from kvpipe.runtime.quantized_store import QuantizedStore
from kvpipe.runtime.store import RaggedStore

from conftest import fresh_seed, tiny_model


def filled_cache(layers: int = 3, batch: int = 2, heads: int = 2, tokens: int = 40, dim: int = 16) -> KVPipeCache:
    """A cache filled through ``update`` from fresh random tensors, as a forward would fill it; no model."""
    generator = torch.Generator().manual_seed(fresh_seed())
    cache = KVPipeCache(layers)
    for index in range(layers):
        keys, values = (torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(2))
        cache.update(keys, values, index)
    return cache


def stored_positions(cache: KVPipeCache) -> list[torch.Tensor]:
    return [layer.store.padded()[2] for layer in cache.layers]


def test_a_cache_is_filled_compressed_and_copied_without_a_model():
    cache = filled_cache()
    full_bytes = sum(layer.nbytes for layer in cache.layers)
    assert cache.get_seq_length() == 40 and cache.binding is None and cache.storage.backend == "torch"
    twin = copy.deepcopy(cache)
    compress(kvpipe.build("streaming"), cache)                          # keep 0.5: 4 sinks, then the newest
    for layer in cache.layers:
        assert isinstance(layer.store, RaggedStore) and layer.tail_length == 0
        assert layer.kept_slots().eq(20).all()
        positions = layer.store.padded()[2]
        assert positions[..., :4].eq(torch.arange(4)).all() and positions[..., 4:].eq(torch.arange(24, 40)).all()
    assert sum(layer.nbytes for layer in cache.layers) == pytest.approx(full_bytes / 2, rel=0.05)
    assert cache.get_seq_length() == 40 and cache.compress_seconds > 0 and cache.budget_shortfall == 0
    # the copy taken before is untouched, and compressing it gives the same kept sets
    assert all(layer.store is None and layer.tail_length == 40 for layer in twin.layers)
    compress(kvpipe.build("streaming"), twin)
    assert all(torch.equal(a, b) for a, b in zip(stored_positions(cache), stored_positions(twin)))


def test_a_quantizing_pipeline_stores_pages_with_the_caches_backend():
    cache = filled_cache(tokens=300)
    compress(kvpipe.build("int4"), cache)
    store = cache.layers[0].store
    assert isinstance(store, QuantizedStore) and store.quant.backend == "torch"
    keys, values, _ = store.padded(torch.float32)
    assert keys.shape == (2, 2, 300, 16)                                 # every token kept, in 4 bits
    assert cache.layers[0].nbytes < 0.4 * 2 * 2 * 2 * 300 * 16 * 4


def test_a_pipeline_that_observes_needs_the_observations():
    cache = filled_cache()
    with pytest.raises(ValueError, match="observe the queries"):
        compress(kvpipe.build("default"), cache)


@pytest.mark.parametrize("name", ["streaming", "random", "int4"])
def test_compressing_a_captured_cache_equals_compressing_through_attach(name, random_ids):
    """The same model, the same prompt: a cache filled by the bare model and compressed afterwards keeps exactly
    the slots that attach() keeps when the pipeline runs inside the forward."""
    model, ids = tiny_model(), random_ids(2, 150)
    pipeline = kvpipe.build(name)
    with torch.no_grad():
        captured = KVPipeCache(len(model.model.layers))
        model(ids, past_key_values=captured, use_cache=True)
        compress(pipeline, captured)
        with pipeline.attach(model) as handle:
            attached = handle.cache()
            model(ids, past_key_values=attached, use_cache=True)
    for mine, theirs in zip(captured.layers, attached.layers):
        assert type(mine.store) is type(theirs.store)
        a, b = (layer.store.padded(*(torch.float32,) if name == "int4" else ()) for layer in (mine, theirs))
        assert torch.equal(a[2], b[2])                                     # the same kept positions
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])         # holding the same keys and values


def test_a_fork_shares_tensors_and_diverges_without_touching_the_original():
    cache = filled_cache()
    fork = cache.fork()
    assert all(a.keys is b.keys for a, b in zip(cache.layers, fork.layers))      # no copy until it diverges
    compress(kvpipe.build("streaming"), fork)
    generator = torch.Generator().manual_seed(fresh_seed())
    fork.update(*(torch.randn(2, 2, 1, 16, generator=generator) for _ in range(2)), 0)
    assert all(layer.store is None and layer.tail_length == 40 for layer in cache.layers)
    assert cache.get_seq_length() == 40 and fork.get_seq_length() == 41
    assert fork.layers[0].kept_slots().eq(21).all() and fork.layers[1].kept_slots().eq(20).all()


def test_a_handle_takes_a_cache_compressed_elsewhere_and_refuses_one_of_another_model(tiny):
    from kvpipe.errors import UnsupportedModelError

    pipeline = kvpipe.build("streaming")
    with pipeline.attach(tiny) as handle:
        cache = filled_cache(layers=2, batch=1, tokens=40)
        compress(pipeline, cache)
        taken = handle.take(cache)
        assert taken is cache and cache.binding is handle.session.binding
        out = tiny.generate(torch.randint(2, 200, (1, 41)), past_key_values=cache, max_new_tokens=3,
                            min_new_tokens=3, do_sample=False)
        assert out.shape[1] == 44 and cache.get_seq_length() == 43
        with pytest.raises(UnsupportedModelError, match="3 layers and the attached model 2"):
            handle.take(filled_cache(layers=3))
