"""attention_mass against a plain per-query reference, with GQA, causality and left padding."""
from __future__ import annotations

import pytest
import torch

from kvpipe.core.context import Observation
from kvpipe.stages.attention_mass import AttentionMass

from conftest import fresh_seed


def reference_mass(query, key, scaling, query_valid, key_valid, window, normalize, group):
    """Loop over queries and heads; no batching tricks."""
    batch, q_heads, q, _ = query.shape
    kv_heads, kv = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    mass = torch.zeros(batch, q_heads, kv, dtype=torch.float64)
    seen = torch.zeros(batch, kv, dtype=torch.float64)
    first = 0 if window is None else max(0, q - window)
    for b in range(batch):
        for i in range(first, q):
            if not query_valid[b, i]:
                continue
            position = kv - q + i
            seen[b, : position + 1] += 1
            for h in range(q_heads):
                k = key[b, h // groups, : position + 1].double()
                logits = (k @ query[b, h, i].double()) * scaling
                logits[~key_valid[b, h // groups, : position + 1]] = float("-inf")
                mass[b, h, : position + 1] += torch.softmax(logits, -1)
    if normalize:
        mass /= seen.clamp(min=1)[:, None]
    mass = mass.view(batch, kv_heads, groups, kv)
    return mass.mean(2) if group == "mean" else mass.amax(2)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("group", ["mean", "max"])
def test_matches_reference(window, normalize, group):
    generator = torch.Generator().manual_seed(fresh_seed())
    batch, q_heads, kv_heads, n, dim = 2, 6, 2, 19, 8
    query = torch.randn(batch, q_heads, n, dim, generator=generator)
    key = torch.randn(batch, kv_heads, n, dim, generator=generator)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :4] = False  # row 1 is left-padded
    obs = Observation(0, query, key, key, dim**-0.5, valid, valid[:, None].expand(batch, kv_heads, n))
    stage = AttentionMass(AttentionMass.Params(window=window, normalize=normalize, group=group))
    got = stage.observe(obs)
    want = reference_mass(query, key, dim**-0.5, valid, obs.key_valid, window, normalize, group)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bool((got[1, :, :4] == 0).all())  # padding receives no attention


def test_pooling_spreads_a_peak_to_its_neighbours():
    scores = torch.zeros(1, 1, 30)
    scores[0, 0, 10] = 1.0
    from kvpipe.stages.attention_mass import pool_neighbours

    pooled = pool_neighbours(scores, 5)
    assert pooled[0, 0].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]
