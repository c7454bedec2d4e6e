"""Compressed caches saved and loaded (safetensors), and forks that answer different questions apart."""
from __future__ import annotations

import io

import pytest
import torch

import kvpipe
from kvpipe.errors import KVPipeError, UnsupportedModelError
from kvpipe.models import cache_arg
from kvpipe.runtime.quantized_store import QuantizedStore
from kvpipe.runtime.store import RaggedStore

from conftest import fresh_seed, shipped_pipeline, tiny_model

CONTEXT, QUESTION, ANSWER = 96, 7, 6


def greedy(model, cache, context: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """The answer's token ids after ``question``, resumed from ``cache`` holding ``context``."""
    ids = torch.cat([context, question], -1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_arg(model, cache),
                         max_new_tokens=ANSWER, min_new_tokens=ANSWER, do_sample=False)
    return out[0, ids.shape[1]:]


def prompts(count: int):
    generator = torch.Generator().manual_seed(fresh_seed())
    return (torch.randint(2, 250, (1, length), generator=generator) for length in (CONTEXT, *[QUESTION] * count))


@pytest.mark.parametrize("name, store", [("streaming", RaggedStore), ("value-aware-int4", QuantizedStore),
                                         ("int4", QuantizedStore)])
def test_a_saved_cache_answers_as_the_one_in_memory(tmp_path, name, store):
    model = tiny_model()
    pipeline = shipped_pipeline(name, tmp_path)
    context, question = prompts(1)
    with pipeline.attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(context, **cache_arg(model, cache))
        assert isinstance(cache.layers[0].store, store) and cache.compressed_by is not None
        kvpipe.save_cache(cache, tmp_path / "cache.safetensors")
        loaded = kvpipe.load_cache(tmp_path / "cache.safetensors", model)
        assert loaded.get_seq_length() == CONTEXT
        assert handle.stats(loaded)["kv_bytes"] == handle.stats(cache)["kv_bytes"]
        for ours, theirs in zip(cache.layers, loaded.layers):
            assert torch.equal(ours.kept_slots(), theirs.kept_slots())
            for a, b in zip(ours.view(None).__dict__.values(), theirs.view(None).__dict__.values()):
                assert torch.equal(a, b)
        assert torch.equal(greedy(model, cache, context, question), greedy(model, loaded, context, question))


def test_forks_answer_their_own_questions_apart(tmp_path):
    model = tiny_model()
    context, first, second = prompts(2)
    with shipped_pipeline("value-aware-int4", tmp_path).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(context, **cache_arg(model, cache))
        alone = greedy(model, cache.fork(), context, second)           # the second question asked on its own
        one, two = cache.fork(), cache.fork()
        greedy(model, one, context, first)
        assert torch.equal(greedy(model, two, context, second), alone)     # the first fork's question is unseen
        assert cache.get_seq_length() == CONTEXT
        assert one.get_seq_length() == two.get_seq_length() == CONTEXT + QUESTION + ANSWER - 1


def test_loading_refuses_another_pipeline_another_model_and_a_bad_file(tmp_path):
    model = tiny_model()
    (context,) = prompts(0)
    with kvpipe.build("streaming").attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(context, **cache_arg(model, cache))
        path = kvpipe.save_cache(cache, tmp_path / "cache.safetensors")
    with pytest.raises(UnsupportedModelError, match="needs a model with a kvpipe pipeline attached"):
        kvpipe.load_cache(path, model)
    with kvpipe.build("default").attach(model), pytest.raises(KVPipeError, match="another pipeline"):
        kvpipe.load_cache(path, model)
    wider = tiny_model(num_key_value_heads=4)
    with kvpipe.build("streaming").attach(wider), \
            pytest.raises(UnsupportedModelError, match="kv_heads 2 .this model: 4"):
        kvpipe.load_cache(path, wider)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache at all")
    with kvpipe.build("streaming").attach(model), pytest.raises(KVPipeError, match="junk.safetensors: not a readable"):
        kvpipe.load_cache(tmp_path / "junk.safetensors", model)


def test_a_cache_of_the_old_page_layout_is_refused_with_what_to_do(tmp_path):
    """Format 1 held KIVI's int32 words; page layout 2 reads bytes in another order, so an old file must not load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_model()
    (context,) = prompts(0)
    with shipped_pipeline("int4", tmp_path).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(context, **cache_arg(model, cache))
        path = kvpipe.save_cache(cache, tmp_path / "cache.safetensors")
        with safe_open(str(path), "pt") as file:
            metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
        save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**metadata, "format": "kvpipe-cache/1"})
        with pytest.raises(KVPipeError, match="earlier kvpipe .kvpipe-cache/1.*compress the context again"):
            kvpipe.load_cache(tmp_path / "old.safetensors", model)


def test_pickling_a_cache_does_not_pickle_the_model(tmp_path):
    model = tiny_model()
    (context,) = prompts(0)
    with shipped_pipeline("int4", tmp_path).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(torch.cat([context, context], -1), **cache_arg(model, cache))
        model(context[:, :1], **cache_arg(model, cache))          # a decode step fills the dequantization workspace
        held = handle.stats(cache)["kv_bytes"]
    assert cache.storage.workspace.nbytes > 0
    buffer = io.BytesIO()
    torch.save(cache, buffer)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert buffer.tell() < held + 64 * 1024 < weights, (buffer.tell(), held, weights)


@pytest.mark.real_model
def test_a_compressed_context_saved_and_reloaded_answers_the_same_on_smollm(tmp_path, smollm):
    from kvpipe.eval.protocol import Protocol
    from kvpipe.eval.tasks import make_cases

    model, tokenizer = smollm
    protocol = Protocol(model, tokenizer)                  # question-agnostic: the question comes after loading
    case = make_cases(tokenizer, 400, 1, seed=fresh_seed() % 1000, kind="single")[0]
    with kvpipe.build("value-aware-int4").attach(model) as handle:
        cache = handle.cache()
        protocol.prefill(case, cache)
        kvpipe.save_cache(cache, tmp_path / "context.safetensors")
        loaded = kvpipe.load_cache(tmp_path / "context.safetensors", model)
        in_memory, reloaded = protocol.generate(case, cache), protocol.generate(case, loaded)
    assert torch.equal(in_memory[1], reloaded[1]) and in_memory[0] == reloaded[0]
