"""Property-based budget invariants of the eviction primitives, on random scores, lengths and padding."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpipe.budget import slots_per_head
from kvpipe.context import Candidates, CompressionContext, LayerView
from kvpipe.kernels.topk import select_topk
from kvpipe.spec import Budget
from kvpipe.stages.coupled_projection import CoupledProjection
from kvpipe.stages.sinks_window import protected_ends
from kvpipe.stages.topk import TopK
from kvpipe.stages.uniform import Uniform
from kvpipe.store import RaggedStore


@st.composite
def layers(draw):
    """A random padded layer: ``valid [B, H, n]`` with left padding per row, random scores."""
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(8, 48))
    pads = draw(st.lists(st.integers(0, n - 8), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    valid = torch.stack([torch.arange(n) >= p for p in pads])[:, None].expand(batch, heads, n).clone()
    scores = torch.randn(batch, heads, n, generator=generator)
    return valid, scores, generator


budgets = st.one_of(st.builds(Budget, keep=st.floats(0.05, 1.0)),
                    st.builds(Budget, tokens=st.integers(1, 64)),
                    st.builds(Budget, bytes=st.floats(0.05, 1.0)))


def run_eviction(valid, scores, budget, sinks, window, generator, block: int = 0):
    batch, heads, n = valid.shape
    head_dim = 4
    keys = torch.randn(batch, heads, n, head_dim, generator=generator)
    positions = torch.arange(n).expand(batch, heads, n)
    view = LayerView(keys, keys.clone(), positions, valid)
    ctx = CompressionContext([view], budget, valid[:, 0].sum(-1), RaggedStore.slot_bytes(head_dim, keys.dtype),
                             2 * head_dim * 4)
    ctx.write(GIVEN, "scores", [scores])
    ends = protected_ends(valid, sinks, window)
    ctx.write(GIVEN, "candidates", [Candidates(ends, valid.clone())])
    Uniform(Uniform.Params())(ctx)
    allocation = ctx.slots["allocation"][0]
    if bool((ends.sum(-1) > allocation).any()):
        return None
    evictor(block)(ctx)
    return view, ctx, allocation, ctx.slots["keep"][0]


GIVEN = SimpleNamespace(id="given")  # stands for the upstream stages that wrote scores and candidates


def topk() -> TopK:
    return evictor(0)


def evictor(block: int):
    """``topk`` (block 0) or ``coupled_projection`` with that block size, wired to the given slots."""
    stage = TopK(TopK.Params()) if block == 0 else CoupledProjection(CoupledProjection.Params(block=block))
    stage.sources = {"scores": ["given"], "candidates": ["given"], "allocation": ["uniform"]}
    return stage


@settings(max_examples=150, deadline=None)
@given(layers(), budgets, st.integers(0, 4), st.integers(0, 8), st.sampled_from([0, 1, 4, 16]))
def test_eviction_invariants(layer, budget, sinks, window, block):
    """For ``topk`` (block 0) and ``coupled_projection`` (block 1, 4, 16)."""
    valid, scores, generator = layer
    done = run_eviction(valid, scores, budget, sinks, window, generator, block)
    if done is None:  # the budget cannot hold the protected tokens: TopK refuses (tested below)
        return
    view, ctx, allocation, keep = done
    n_real = valid[:, 0].sum(-1)
    # kept per head == allocation, and the allocation never exceeds what the budget grants
    assert torch.equal(keep.sum(-1), allocation)
    grant = slots_per_head(budget, n_real, ctx.slot_bytes, ctx.full_slot_bytes)
    assert torch.equal(allocation, grant[:, None].expand_as(allocation))
    total_bytes = keep.sum() * ctx.slot_bytes
    if budget.kind == "keep":
        assert int(keep.sum()) <= budget.keep * int(valid.sum()) + 1e-6
    elif budget.kind == "tokens":
        assert bool((keep.sum(-1) <= budget.tokens).all())
    else:
        assert float(total_bytes) <= budget.bytes * int(valid.sum()) * ctx.full_slot_bytes + 1e-6
    # padding is never kept; protected ends always are
    assert not bool((keep & ~valid).any())
    assert bool((keep | ~ctx.slots["candidates"][0].protected).all())
    # physical compaction: positions strictly increasing, unique and in range; bytes match the formula
    store = RaggedStore.from_padded(view.keys, view.values, view.positions, keep)
    keys, _, positions = store.padded()
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            pos = positions[b, h, : int(store.lengths[b, h])]
            assert bool((pos[1:] > pos[:-1]).all())
            assert bool(valid[b, h, pos].all())
            assert torch.equal(keys[b, h, : len(pos)], view.keys[b, h, pos])
    expected = int(keep.sum()) * ctx.slot_bytes + store.lengths.numel() * 4
    assert store.nbytes == expected


@settings(max_examples=100, deadline=None)
@given(layers(), st.integers(0, 64))
def test_topk_is_idempotent(layer, k):
    valid, scores, _ = layer
    allocation = torch.full(valid.shape[:2], k)
    once = select_topk(scores, allocation, valid)
    twice = select_topk(scores, allocation, once)
    assert torch.equal(once, twice)
    assert torch.equal(once.sum(-1), torch.minimum(allocation, valid.sum(-1)))


def test_protected_beyond_budget_is_a_clear_error():
    import pytest

    from kvpipe import BudgetError

    ctx = _ctx_over_budget(torch.ones(1, 2, 20, dtype=torch.bool))  # keeps 5, protects 4 + 8
    with pytest.raises(BudgetError, match="keeps 5 slots per head but 12 are protected"):
        topk()(ctx)


def _ctx_over_budget(valid):
    view = LayerView(torch.randn(*valid.shape, 4), torch.randn(*valid.shape, 4),
                     torch.arange(valid.shape[-1]).expand(valid.shape), valid)
    ctx = CompressionContext([view], Budget(keep=0.25), valid[:, 0].sum(-1), 36, 32)
    ctx.write(GIVEN, "scores", [torch.randn(valid.shape)])
    ctx.write(GIVEN, "candidates", [Candidates(protected_ends(valid, 4, 8), valid.clone())])
    Uniform(Uniform.Params())(ctx)
    return ctx


@settings(max_examples=60, deadline=None)
@given(layers(), budgets, st.integers(0, 4), st.integers(0, 8))
def test_coupled_projection_with_block_one_is_topk(layer, budget, sinks, window):
    valid, scores, generator = layer
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    plain = run_eviction(valid, scores, budget, sinks, window, torch.Generator().manual_seed(seed), block=0)
    coupled = run_eviction(valid, scores, budget, sinks, window, torch.Generator().manual_seed(seed), block=1)
    if plain is not None:
        assert torch.equal(plain[3], coupled[3])
