"""The shared stage suite: every registered stage, parametrized from the registry, so a new stage is covered
without writing a test. Each runs inside a minimal pipeline on a tiny model with a left-padded batch."""
from __future__ import annotations

import tempfile

import pytest
import torch
import yaml

import kvpipe
from kvpipe.core.registry import all_stages

from conftest import kept_bytes_ratio, tiny_gates_file, tiny_model

STAGES = sorted(all_stages())
KEEP = 0.4
SINKS, WINDOW = 2, 6
TINY_GATES = tiny_gates_file(tempfile.mkdtemp(prefix="kvpipe-gates-"))    # shaped for tiny_model()


def pipeline_around(name: str) -> dict:
    """The smallest sensible pipeline that exercises ``name``."""
    family = all_stages()[name].family
    protect = {"stage": "sinks_window", "params": {"sinks": SINKS, "window": WINDOW}}
    if name == "combine":
        stages = [protect, {"stage": "random", "after": ["sinks_window"]},
                  {"stage": "knorm", "after": ["sinks_window"]},
                  {"stage": "combine", "after": ["random", "knorm"]}, "uniform", "topk"]
    elif name == "retention_gates":
        stages = [protect, {"stage": name, "params": {"gates": TINY_GATES}}, "uniform", "topk"]
    elif name == "reconstruction":              # tiny models have no tokenizer: read the context again bare
        stages = [protect, {"stage": name, "params": {"prompt": "", "chunk": 16}}, "uniform", "topk"]
    elif family == "scoring":
        stages = [protect, name, "uniform", "topk"]
    elif family == "budget allocation":
        stages = [protect, "attention_mass", name, "topk"]
    elif name == "refit_values":                # it corrects the values of the kept set: after eviction
        stages = [protect, "random", "uniform", "topk", name]
    elif family == "evidence recovery":
        stages = [protect, name, "attention_mass", "uniform", "topk"]
    elif family == "quantization":              # small pages and window so the short prompt really is packed
        stages = [protect, "random", "uniform", "topk", {"stage": name, "params": {"group_size": 32, "residual": 4}}]
    elif family == "candidate selection":
        stages = [protect] + ([name] if name != "sinks_window" else []) + ["random", "uniform", "topk"]
    else:
        stages = [protect, "random", "uniform", name]
    return {"version": 1, "budget": {"keep": KEEP}, "stages": stages}


@pytest.mark.parametrize("name", STAGES)
def test_params_round_trip_through_yaml(name):
    cls = all_stages()[name]
    params = cls.Params()
    text = yaml.safe_dump(params.model_dump())
    assert cls.Params.model_validate(yaml.safe_load(text)) == params
    assert cls.__doc__, f"stage {name} needs a docstring: `kvpipe stages` shows it"


@pytest.mark.parametrize("name", STAGES)
def test_stage_in_a_pipeline_keeps_the_invariants(name, random_ids):
    model = tiny_model("llama", "sdpa")
    pipeline = kvpipe.build(pipeline_around(name))
    lengths = (72, 50)
    ids = random_ids(2, max(lengths))
    mask = torch.stack([torch.arange(max(lengths)) >= max(lengths) - n for n in lengths]).long()
    with pipeline.attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, attention_mask=mask, past_key_values=cache)
        stats = handle.stats(cache)
        kept = stats["kept_tokens"]                                              # [layers, B, Hkv]
        layers, _, heads = kept.shape
        for row, n in enumerate(lengths):
            per_head = int(n * KEEP)
            assert int(kept[:, row].sum()) <= layers * heads * per_head          # global budget per row
            for layer in cache.layers:
                _, _, positions = layer.store.padded()
                valid = layer.store.valid()
                for h in range(heads):
                    pos = positions[row, h][valid[row, h]]
                    assert bool((pos[1:] > pos[:-1]).all())                      # sorted and unique
                    assert int(pos.min()) >= max(lengths) - n                    # no padding kept
                    real = torch.arange(max(lengths) - n, max(lengths))
                    assert set(real[:SINKS].tolist() + real[-WINDOW:].tolist()) <= set(pos.tolist())
        assert kept_bytes_ratio(stats) > 1.5
        # and decoding continues on the compressed cache
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, max(lengths) + 3)


@pytest.mark.parametrize("name", STAGES)
def test_stage_is_deterministic(name, random_ids):
    model = tiny_model("llama", "sdpa")
    pipeline = kvpipe.build(pipeline_around(name))
    ids = random_ids(1, 60)
    kept = []
    with pipeline.attach(model) as handle, torch.inference_mode():
        for _ in range(2):
            cache = handle.cache()
            model(ids, past_key_values=cache)
            kept.append([torch.cat([t.flatten() for t in layer.store.padded()]) for layer in cache.layers])
    assert all(torch.equal(a, b) for a, b in zip(*kept))
