"""Between two flushes, decode steps over a compressed cache are one and the same step: what a CUDA graph replays.

A recorder (``TorchDispatchMode``) lists, for each decode step, every operator dispatched while kvpipe's own code is
on the stack (``kvpipe/``, ``stages/``, ``kernels/``), with the shapes and dtypes of its tensor arguments and
results, and where in kvpipe's code it came from. After a compressing prefill of a padded batch, consecutive
one-token steps (fewer than a page and than a ragged store's static tail) must make the same list every step, read
no value on the host, and write the new token in place. ``int4``, ``default`` and ``value-aware-int4``, on both
backends (``triton``: the fused kernel, here in Triton's interpreter).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from test_host_syncs import OWN_CODE, READS_A_VALUE, ROOT
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kvpipe.runtime import cache as cache_module

from conftest import left_padded_batch, shipped_pipeline, tiny_model

STEPS = 20


@functools.cache
def own_file(filename: str) -> str | None:
    """``filename`` relative to the project root if it is kvpipe's code, else None."""
    path = str(Path(filename).resolve())
    return str(Path(path).relative_to(ROOT)) if path.startswith(OWN_CODE) else None


def innermost_own_frame() -> str | None:
    """``file:line`` of the innermost frame of kvpipe's code on the stack (frames walked, no source read)."""
    frame = sys._getframe(2)
    while frame is not None:
        where = own_file(frame.f_code.co_filename)
        if where is not None:
            return f"{where}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def signature(value) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tree_leaves(value) if isinstance(t, torch.Tensor))


class StepRecorder(TorchDispatchMode):
    """``steps[i]``: the operators of step ``i`` dispatched under kvpipe's code, as ``(where, op, inputs,
    outputs)``; ``reads[i]``: those that read a value on the host."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[tuple]] = []
        self.reads: list[list[str]] = []

    def next_step(self) -> None:
        self.steps.append([])
        self.reads.append([])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = innermost_own_frame() if self.steps else None
        if where is not None:
            self.steps[-1].append((where, str(func), signature((args, kwargs)), signature(out)))
            if func in READS_A_VALUE:
                self.reads[-1].append(f"{func} at {where}")
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["int4", "default", "value-aware-int4"])
def test_decode_steps_between_flushes_are_the_same_step(name, backend, tmp_path, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    # a tail that holds every recorded step from the start (by default it starts smaller and doubles: a growth is
    # a new shape, like a flush, and the steps between two of them are what a graph replays)
    monkeypatch.setattr(cache_module, "STATIC_TAIL_SLOTS", 2 * STEPS)
    model = tiny_model()
    ids, mask = left_padded_batch(40)
    with shipped_pipeline(name, tmp_path, backend=backend).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, attention_mask=mask, past_key_values=cache)
        assert all(layer.store is not None for layer in cache.layers)
        token = ids[:, -1:]
        recorder = StepRecorder()
        with recorder:
            for _ in range(STEPS + 1):         # the first step makes the static tails (and reads store shapes)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                recorder.next_step()
                model(token, attention_mask=mask, past_key_values=cache)
        layer = cache.layers[0]
        assert layer.static_tail is not None and layer.static_tail.length == STEPS + 1
        assert layer.get_seq_length() == ids.shape[1] + STEPS + 1
    first, *rest = recorder.steps[1:]
    assert any("index_copy_" in op for _, op, _, _ in first)          # the token is written in place
    for step, ops in enumerate(rest, start=2):
        assert ops == first, f"step {step} differs from step 1: " + next(
            f"{a} != {b}" for a, b in zip(ops + [None] * len(first), first + [None] * len(ops)) if a != b)
    reads = [where for step in recorder.reads[1:] for where in step]
    assert reads == [], "\n".join(reads[:5])


def test_a_static_tail_decodes_as_the_plain_one_through_a_flush(tmp_path):
    """The same tokens with static tails and with plain ones (a compressed cache, greedy decoding past a page, so
    the static tail grows, fills, joins the store and starts over), on a padded batch."""
    model = tiny_model()
    ids, mask = left_padded_batch(40)
    generated = {}
    for static in (True, False):
        pipeline = shipped_pipeline("int4", tmp_path, backend="torch")
        with pipeline.attach(model), torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
            if not static:
                patch.setattr(cache_module.KVPipeLayer, "_writes_in_place", lambda layer, keys: False)
            generated[static] = model.generate(ids, attention_mask=mask, max_new_tokens=140, min_new_tokens=140,
                                               do_sample=False)
    assert torch.equal(generated[True], generated[False])


def test_a_fork_gets_its_own_static_tail(tmp_path):
    """Decode steps write into a static tail in place: a fork made between two steps must not see the other's."""
    model = tiny_model()
    ids, mask = left_padded_batch(40)
    with shipped_pipeline("default", tmp_path).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, attention_mask=mask, past_key_values=cache)
        token = ids[:, -1:]
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        model(token, attention_mask=mask, past_key_values=cache)
        twin = cache.fork()
        before = twin.layers[0].keys.clone()
        model(token + 1, attention_mask=torch.cat([mask, torch.ones_like(token)], 1), past_key_values=cache)
        assert torch.equal(twin.layers[0].keys, before)
        assert twin.layers[0].static_tail is not cache.layers[0].static_tail
        assert cache.layers[0].tail_length == twin.layers[0].tail_length + 1
