"""Wilson intervals and the exact McNemar test, against values computed by hand and by their definitions."""
from __future__ import annotations

import math
import random

import pytest

from kvpipe.eval.stats import paired, sign_test, wilson

from conftest import fresh_seed


@pytest.mark.parametrize("correct, total, low, high", [
    (0, 10, 0.0, 0.2775),          # the textbook cases (Newcombe 1998, Table I method 3)
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_matches_published_intervals(correct, total, low, high):
    assert wilson(correct, total) == pytest.approx((low, high), abs=1e-4)


def test_wilson_contains_the_estimate_and_narrows_with_more_cases():
    rng = random.Random(fresh_seed())
    for _ in range(200):
        total = rng.randint(1, 400)
        correct = rng.randint(0, total)
        low, high = wilson(correct, total)
        assert 0 <= low <= correct / total <= high <= 1
        wider = wilson(correct, total), wilson(4 * correct, 4 * total)
        assert wider[1][1] - wider[1][0] < wider[0][1] - wider[0][0]


def test_sign_test_is_the_two_sided_binomial_tail():
    assert sign_test(0, 6) == pytest.approx(2 / 64)          # all six discordant cases one way: p = 2 * 0.5^6
    assert sign_test(1, 1) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(2, 10) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2 ** 12)
    assert sign_test(3, 9) == sign_test(9, 3)


def test_paired_counts_only_discordant_cases_and_needs_the_same_cases():
    a = [True, True, True, True, True, True, False, True]
    b = [False, False, False, False, False, False, False, True]
    test = paired(a, b)
    assert (test.only_a, test.only_b) == (6, 0) and test.significant and test.p == pytest.approx(2 / 64)
    assert not paired(a[:3], b[:3]).significant                # 3 of 3 one way: p = 0.25, a tie
    with pytest.raises(ValueError, match="same cases"):
        paired(a, b[:-1])
