"""Scorers and allocators against hand-written references on fresh random inputs."""
from __future__ import annotations

import unittest.mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpipe.core import context
from kvpipe.core.allocation import calibrate, pooled_counts
from kvpipe.core.context import Observation
from kvpipe.stages.attention_mass import attention_mass
from kvpipe.stages.critical import Critical
from kvpipe.stages.output_change import OutputChange
from kvpipe.stages.tova import TOVA

from conftest import fresh_seed


def observation(batch=1, q_heads=4, kv_heads=2, q=6, kv=6, dim=8, model_dim=12, seed=None) -> Observation:
    generator = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return Observation(0, rand(batch, q_heads, q, dim), rand(batch, kv_heads, kv, dim), rand(batch, kv_heads, kv, dim),
                       dim**-0.5, torch.ones(batch, q, dtype=torch.bool),
                       torch.ones(batch, kv_heads, kv, dtype=torch.bool),
                       rand(model_dim, q_heads * dim))


def softmax_row(obs: Observation, head: int, t: int) -> torch.Tensor:
    """Causal attention of query t of query head ``head`` (batch 0), float64."""
    kv, q = obs.key.shape[2], obs.query.shape[2]
    position = kv - q + t
    k = obs.key[0, head // obs.groups, : position + 1].double()
    return torch.softmax(k @ obs.query[0, head, t].double() * obs.scaling, -1)


def test_tova_is_the_last_query_attention_averaged_over_all_heads():
    obs = observation()
    got = TOVA(TOVA.Params()).observe(obs)
    want = torch.stack([softmax_row(obs, h, obs.query.shape[2] - 1) for h in range(4)]).mean(0)
    for kv_head in range(2):
        torch.testing.assert_close(got[0, kv_head].double(), want, rtol=1e-5, atol=1e-7)


@given(chunk=st.integers(1, 7), padded=st.booleans())
@settings(max_examples=12, deadline=None)
def test_max_attention_is_the_largest_probability_any_query_of_the_group_gives(chunk, padded):
    """``Observation.max_attention`` (log space, masks only where they bite, queries in chunks) against the
    softmax row of every query, float64, on a padded batch: a padding key gets nothing and is never counted."""
    obs = observation(batch=2, q=5, kv=9)
    if padded:
        obs.key_valid[1, :, :2] = False                # row 1: two padding keys
        obs.query_valid[0, 1] = False                  # row 0: a padding query, which gives nothing
    got = obs.max_attention(chunk)
    for row in range(2):
        for kv_head in range(2):
            want = torch.zeros(9, dtype=torch.float64)
            for head in range(kv_head * obs.groups, (kv_head + 1) * obs.groups):
                for t in range(5):
                    if not obs.query_valid[row, t]:
                        continue
                    position = 9 - 5 + t
                    k = obs.key[row, kv_head, : position + 1].double()
                    logits = k @ obs.query[row, head, t].double() * obs.scaling
                    logits[~obs.key_valid[row, kv_head, : position + 1]] = float("-inf")
                    want[: position + 1] = torch.maximum(want[: position + 1], torch.softmax(logits, -1))
            torch.testing.assert_close(got[row, kv_head].double(), want, rtol=1e-5, atol=1e-7)


def test_output_change_equals_removing_the_token_and_recomputing():
    """For one query the score of token i is ||W_O (o - o_without_i)||, computed here by brute force."""
    obs = observation(q_heads=1, kv_heads=1, q=1, kv=9)
    got = OutputChange(OutputChange.Params(window=1)).observe(obs)[0, 0].double()
    weights = softmax_row(obs, 0, 0)
    values = obs.value[0, 0].double()
    w_o = obs.out_proj.double()
    output = weights @ values
    for i in range(9):
        keep = torch.arange(9) != i
        without = torch.softmax((obs.key[0, 0, keep].double() @ obs.query[0, 0, 0].double()) * obs.scaling, -1)
        changed = without @ values[keep]
        torch.testing.assert_close(got[i], (w_o @ (output - changed)).norm(), rtol=1e-4, atol=1e-6)


def test_sizes_through_w_o_equal_the_projection_however_the_rows_are_blocked(monkeypatch):
    """``projected_l1`` (blocks of rows) and ``projected_l2`` (Gram matrices) against ``W_O^h x`` built whole, in
    float64; one row per block."""
    obs = observation(batch=2, q_heads=4, kv_heads=2, kv=7, model_dim=12)
    x = torch.randn(2, 4, 7, 8, generator=torch.Generator().manual_seed(fresh_seed()))
    projected = torch.einsum("bhnd,mhd->bhnm", x.double(), obs.out_proj_per_head().double())
    monkeypatch.setattr(context, "BLOCK_BYTES", 1)
    torch.testing.assert_close(obs.projected_l1(x).double(), projected.abs().sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obs.projected_l2(x).double(), projected.norm(dim=-1), rtol=1e-5, atol=1e-6)


@given(block=st.integers(1, 6), padded=st.booleans())
@settings(max_examples=12, deadline=None)
def test_attention_probs_and_mass_are_the_masked_softmax_in_any_query_blocks(block, padded):
    """``attention_probs`` (computed in place) against the softmax row of every query in float64, on a padded
    batch (padding keys get nothing, padding queries give nothing), and ``attention_mass`` summed over blocks of
    ``block`` queries against the sum of those rows."""
    obs = observation(batch=2, q=5, kv=9)
    if padded:
        obs.key_valid[1, :, :2] = False
        obs.query_valid[0, 1] = False
    want = torch.zeros(2, 4, 5, 9, dtype=torch.float64)
    for row in range(2):
        for head in range(4):
            for t in range(5):
                if not obs.query_valid[row, t]:
                    continue
                position = 9 - 5 + t
                k = obs.key[row, head // obs.groups, : position + 1].double()
                logits = k @ obs.query[row, head, t].double() * obs.scaling
                logits[~obs.key_valid[row, head // obs.groups, : position + 1]] = float("-inf")
                want[row, head, t, : position + 1] = torch.softmax(logits, -1)
    torch.testing.assert_close(obs.attention_probs(1, 4).double(), want[:, :, 1:4], rtol=1e-5, atol=1e-7)
    with unittest.mock.patch.object(Observation, "query_block", lambda self: block):
        mass = attention_mass(obs, window=None, normalize=False)
    torch.testing.assert_close(mass.double(), want.sum(2), rtol=1e-5, atol=1e-6)


def test_output_change_gram_form_equals_the_projected_distances_on_many_keys():
    """The score's distances ``‖W_O^h (v_i - o_t)‖`` from Gram matrices, against projecting both and taking
    ``torch.cdist`` (what the stage computed before, at D_model width), fp32, 300 keys and a window of 16."""
    obs = observation(q_heads=4, kv_heads=2, q=16, kv=300, dim=16, model_dim=64)
    stage = OutputChange(OutputChange.Params(window=16))
    probs = obs.attention_probs(0, 16)
    values = obs.per_query_head(obs.value.float())
    weight = obs.out_proj_per_head()
    project = lambda x: torch.einsum("bhnd,mhd->bhnm", x, weight)  # noqa: E731
    distance = torch.cdist(project(probs @ values), project(values))
    want = obs.to_kv_heads((probs / (1 - probs).clamp(min=1e-6) * distance).sum(2), "mean")
    torch.testing.assert_close(stage.observe(obs), want, rtol=1e-4, atol=1e-6)


def test_critical_weights_attention_by_projected_value_l1():
    obs = observation(q_heads=2, kv_heads=1, q=4, kv=4)
    eps = 1e-4
    got = Critical(Critical.Params(window=2, epsilon=eps)).observe(obs)[0, 0].double()
    dim = obs.query.shape[-1]
    want = torch.zeros(4, dtype=torch.float64)
    for h in range(2):
        mass = torch.zeros(4, dtype=torch.float64)
        seen = torch.zeros(4, dtype=torch.float64)
        for t in (2, 3):
            row = softmax_row(obs, h, t)
            mass[: len(row)] += row
            seen[: len(row)] += 1
        w_h = obs.out_proj.double()[:, h * dim:(h + 1) * dim]
        value_l1 = (obs.value[0, 0].double() @ w_h.T).abs().sum(-1)
        want += (mass / seen.clamp(min=1) + eps) * value_l1 / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@st.composite
def pools(draw):
    batch, units, n = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 20))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    valid = torch.rand(batch, units, n, generator=generator) < draw(st.floats(0.3, 1.0))
    protected = valid & (torch.rand(batch, units, n, generator=generator) < 0.1)
    scores = torch.randn(batch, units, n, generator=generator)
    return scores, valid, protected


@settings(max_examples=150, deadline=None)
@given(pools(), st.integers(0, 100), st.integers(0, 6))
def test_pooled_counts_invariants(pool, total, floor):
    scores, valid, protected = pool
    batch = scores.shape[0]
    total_t = torch.full((batch,), total)
    floor_t = torch.full((batch,), floor)
    reserved = torch.maximum(protected.sum(-1), torch.minimum(floor_t[:, None], valid.sum(-1)))
    counts = pooled_counts(scores, valid, protected, total_t, floor_t)
    # reserved slots are always kept; beyond them, the budget (or the valid slots) caps the count
    assert torch.equal(counts.sum(-1), torch.maximum(reserved.sum(-1), torch.minimum(total_t, valid.sum((1, 2)))))
    assert bool((counts >= reserved).all()) and bool((counts <= valid.sum(-1)).all())
    bigger = pooled_counts(scores, valid, protected, total_t + 5, floor_t)
    assert bool((bigger >= counts).all())  # monotone: more budget never takes a slot away


def test_rank_calibration_is_a_fraction_of_valid_slots():
    scores = torch.tensor([[[3.0, 1.0, 2.0, 9.0]]])
    valid = torch.tensor([[[True, True, True, False]]])
    torch.testing.assert_close(calibrate(scores, valid, "rank")[0, 0, :3], torch.tensor([2 / 3, 0.0, 1 / 3]))
    z = calibrate(scores, valid, "zscore")[0, 0, :3]
    assert abs(float(z.mean())) < 1e-6


def test_quest_page_bound_is_an_upper_bound_and_tight_per_channel():
    from kvpipe.stages.quest_pages import QuestPages

    obs = observation(q_heads=2, kv_heads=1, q=5, kv=37)
    bound = QuestPages(QuestPages.Params(page_size=8, window=2)).observe(obs)[0, 0]       # [pages]
    assert bound.shape == (5,)
    for page in range(5):
        keys = obs.key[0, 0, page * 8:(page + 1) * 8]
        for h in range(2):
            for t in (3, 4):
                assert float((keys @ obs.query[0, h, t]).max()) <= float(bound[page]) + 1e-5
    one_key = observation(q_heads=1, kv_heads=1, q=1, kv=1)  # a page of one key: the bound is q·k exactly
    exact = QuestPages(QuestPages.Params(page_size=4, window=1)).observe(one_key)[0, 0, 0]
    torch.testing.assert_close(exact, one_key.query[0, 0, 0] @ one_key.key[0, 0, 0])


def test_expected_attention_with_one_query_and_one_future_position_is_plain_attention():
    """One prompt query, no covariance, n_future 1: the expected query is that query moved one position on,
    so the score is ordinary attention of the rotated query."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from kvpipe.stages.expected_attention import ExpectedAttention, average_rotation, rotate_half

    dim, kv = 8, 11
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=16, num_attention_heads=2, head_dim=dim))
    obs = observation(q_heads=1, kv_heads=1, q=1, kv=kv, dim=dim)
    pre = obs.query.clone()
    position = torch.tensor([[kv - 1]])
    cos, sin = rotary(pre, position)
    obs.query, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    obs.positions, obs.rotary = position, (lambda p: rotary(pre, p))
    stage = ExpectedAttention(ExpectedAttention.Params(n_future=1, skip_sinks=0, covariance=False, value_norm=False))
    got = stage.observe(obs)[0, 0]
    cos1, sin1 = rotary(pre, position + 1)
    moved, _ = apply_rotary_pos_emb(pre, pre, cos1, sin1)
    want = torch.softmax(obs.key[0, 0] @ moved[0, 0, 0] * obs.scaling, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, dim)
    c, s = torch.rand(1, dim), torch.rand(1, dim)
    torch.testing.assert_close((average_rotation(c, s)[0] @ x.T).T, x * c + rotate_half(x) * s)


def test_nucleus_is_the_smallest_set_reaching_the_coverage():
    from kvpipe.stages.recover_evidence import nucleus

    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15, 0.0]])
    assert nucleus(probs, 0.8).tolist() == [[False, True, True, False, False]]
    assert nucleus(probs, 0.81).tolist() == [[False, True, True, True, False]]
    assert nucleus(probs, 1.0).tolist() == [[True, True, True, True, False]]    # zero mass is never needed


def test_recovery_finds_a_planted_token_the_lookahead_queries_read():
    """The token the observation window attends to most is recovered; most tokens are not."""
    from kvpipe.stages.recover_evidence import RecoverEvidence

    torch.manual_seed(0)
    batch, heads, kv, dim = 1, 2, 40, 8
    keys = torch.randn(batch, heads, kv, dim)
    query = torch.randn(batch, 4, kv, dim)
    direction = torch.randn(batch, heads, 1, dim)
    query[:, :, -8:] = direction.repeat_interleave(2, 1) * 2                 # the window asks one thing
    planted = 17
    keys[:, :, planted] = direction[:, :, 0] * 4                             # and one token answers it
    obs = Observation(0, query, keys, torch.randn_like(keys), dim ** -0.5, torch.ones(batch, kv, dtype=torch.bool),
                      torch.ones(batch, heads, kv, dtype=torch.bool))
    stage = RecoverEvidence(RecoverEvidence.Params(window=8, coverage=0.5))
    recovered, mass = stage.observe(obs).unbind(-1)
    assert bool(recovered[:, :, planted].all()) and int(recovered.sum()) < heads * kv / 2
    assert int(mass.argmax(-1).unique().item()) == planted


def test_coupled_projection_keeps_a_planted_span_whole():
    from kvpipe.kernels.topk import select_topk
    from kvpipe.stages.coupled_projection import whole_blocks

    scores = torch.full((1, 1, 64), 1.0)
    scores[..., 16:24] = 10.0                     # the strong half of a 16-token fact
    scores[..., 24:32] = 0.1                      # its weak half (say, the digits after the key)
    scores[..., 40:48] = 2.0                      # distractors stronger than the weak half
    open_ = torch.ones(1, 1, 64, dtype=torch.bool)
    room = torch.tensor([[16]])
    plain = select_topk(scores, room, open_)
    assert int(plain[..., 16:32].sum()) == 8                                     # top-k splits the fact
    coupled = whole_blocks(scores, open_, room, block=16)
    assert bool(coupled[..., 16:32].all()) and int(coupled.sum()) == 16        # the projection keeps it whole
    assert not bool(whole_blocks(scores, open_, room, block=1).any())           # block 1 = plain top-k


def _refit_case(seed: int, rows: int = 6, n: int = 12, dim: int = 4):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(rows, n, generator=generator).softmax(-1)
    values = torch.randn(n, dim, generator=generator)
    target = torch.randn(rows, dim, generator=generator)
    return weights, values, target


def test_value_refit_reproduces_one_query_and_vanishes_under_a_huge_ridge():
    from kvpipe.stages.refit_values import ridge_refit

    weights, values, target = _refit_case(0)
    one = torch.tensor([True, False, False, False, False, False])
    refit, _ = ridge_refit(weights, target, values, one, ~one, ridge=1e-9)
    exact, _ = ridge_refit(weights[:1], target[:1], values, one[:1], one[:1], ridge=1e-9)
    assert torch.allclose(weights[:1] @ exact, target[:1], atol=1e-5)          # λ → 0: A_S V' = O
    frozen, _ = ridge_refit(weights, target, values, one, one, ridge=1e9)
    assert torch.allclose(frozen, values, atol=1e-6)                           # λ → ∞: V' = V
    assert refit.shape == values.shape


def test_value_refit_lowers_the_fit_error_and_is_rejected_when_held_out_error_rises():
    from kvpipe.stages.refit_values import ridge_refit

    weights, values, target = _refit_case(1)
    fit = torch.tensor([True, True, True, False, False, False])
    held_target = target.clone()
    held_target[3:] = weights[3:] @ values                # the held-out queries are already served exactly
    refit, report = ridge_refit(weights, held_target, values, fit, ~fit, ridge=0.1)
    assert report["fit_error_after"] < report["fit_error_before"]
    assert report["held_error_after"] > report["held_error_before"] == 0.0
    assert report["accepted"] == 0.0 and torch.equal(refit, values)            # rejected: values unchanged
