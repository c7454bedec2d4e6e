"""Property-based budget invariants of the eviction primitives, on random scores, lengths and padding."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpipe.core.budget import slots_per_head
from kvpipe.core.context import Candidates, CompressionContext, LayerView
from kvpipe.core.spec import Budget
from kvpipe.kernels.topk import select_topk
from kvpipe.runtime.store import RaggedStore
from kvpipe.stages.coupled_projection import CoupledProjection
from kvpipe.stages.sinks_window import protected_ends
from kvpipe.stages.topk import TopK
from kvpipe.stages.uniform import Uniform


@st.composite
def layers(draw):
    """A random padded layer: ``valid [B, H, n]`` with left padding per row or per head (what eviction leaves),
    random scores with ties (rounded) and NaNs drawn in."""
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(8, 48))
    per_head = draw(st.booleans())
    pads = torch.tensor(draw(st.lists(st.integers(0, n - 8), min_size=batch * heads, max_size=batch * heads)))
    pads = pads.view(batch, heads) if per_head else pads.view(batch, heads)[:, :1].expand(batch, heads)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    valid = torch.arange(n) >= pads[..., None]
    scores = torch.randn(batch, heads, n, generator=generator)
    if draw(st.booleans()):
        scores = scores.round()                                    # many ties
    if draw(st.booleans()):
        scores[torch.rand(batch, heads, n, generator=generator) < 0.2] = float("nan")
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
    view, ctx, allocation, keep = run_eviction(valid, scores, budget, sinks, window, generator, block)
    n_real = valid[:, 0].sum(-1)
    protected = ctx.slots["candidates"][0].protected & valid
    # the allocation is what the budget grants; a head keeps it, or all its protected slots when they are more
    # (a prompt shorter than the protected window: kept, and the shortfall reported)
    grant = slots_per_head(budget, n_real, ctx.slot_bytes, ctx.full_slot_bytes)
    assert torch.equal(allocation, grant[:, None].expand_as(allocation))
    expected = torch.minimum(torch.maximum(allocation, protected.sum(-1)), valid.sum(-1))
    assert torch.equal(keep.sum(-1), expected)
    over = (protected.sum(-1) - allocation).clamp_min(0)
    assert ctx.shortfall == int(over.sum())
    within = keep.sum(-1) - over                                       # what the budget itself pays for
    if budget.kind == "keep":
        assert int(within.sum()) <= budget.keep * int(n_real.sum()) * valid.shape[1] + 1e-6
    elif budget.kind == "tokens":
        assert bool((within <= budget.tokens).all())
    else:
        assert float(within.sum() * ctx.slot_bytes) <= \
            budget.bytes * int(n_real.sum()) * valid.shape[1] * ctx.full_slot_bytes + 1e-6
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


def test_protected_beyond_budget_is_kept_and_reported_or_a_clear_error_when_strict():
    import pytest

    from kvpipe import BudgetError

    ctx = _ctx_over_budget(torch.ones(1, 2, 20, dtype=torch.bool))  # keeps 5, protects 4 + 8
    topk()(ctx)
    assert torch.equal(ctx.slots["keep"][0], ctx.slots["candidates"][0].protected)
    assert ctx.shortfall == 2 * (12 - 5)
    strict = _ctx_over_budget(torch.ones(1, 2, 20, dtype=torch.bool), strict=True)
    with pytest.raises(BudgetError, match="keeps 5 slots per head but 12 are protected.*strict: true"):
        topk()(strict)


def test_nan_scores_rank_last_and_never_displace_protected_slots():
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    scores = torch.tensor([[[0.5, float("nan"), 2.0, float("nan"), -1.0, float("inf"), 0.1, float("nan"), 3.0,
                             -float("inf")]]])
    protected = torch.zeros_like(valid)
    protected[..., [1, 9]] = True                                        # a NaN slot and a -inf slot
    keep = select_topk(scores, torch.tensor([[5]]), valid, protected)
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 2, 5, 8, 9]   # protected, then +inf, 3.0, 2.0


def _ctx_over_budget(valid, strict: bool = False):
    view = LayerView(torch.randn(*valid.shape, 4), torch.randn(*valid.shape, 4),
                     torch.arange(valid.shape[-1]).expand(valid.shape), valid)
    ctx = CompressionContext([view], Budget(keep=0.25), valid[:, 0].sum(-1), 36, 32, strict=strict)
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
