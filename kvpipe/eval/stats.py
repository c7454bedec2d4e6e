"""The statistics a benchmark table needs: intervals for an accuracy, and a paired test for two contenders.

Both are exact or near-exact for the small counts we have (tens of cases), with nothing beyond the standard
library: a Wilson score interval (good coverage even near 0 % and 100 %, unlike the normal approximation) and
McNemar's test in its exact form (a two-sided sign test on the cases where exactly one of the two is right).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054      # two-sided 95 % normal quantile
ALPHA = 0.05


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval ``(low, high)`` of a proportion ``correct / total``, as fractions."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    # at 0 % and 100 % the interval ends exactly at the observed value (rounding would put it a hair inside)
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == total else centre + half)


@dataclass(frozen=True)
class Paired:
    """Two contenders on the same cases: where they disagree, and the exact McNemar p-value."""

    only_a: int          # cases A answers and B does not
    only_b: int
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def describe(self) -> str:
        return f"{self.only_a} vs {self.only_b} cases answered by one only, p = {self.p:.3g}"


def paired(a: Sequence[bool], b: Sequence[bool]) -> Paired:
    """Exact McNemar test of ``a`` and ``b`` (correctness per case, same cases in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"a paired test needs the same cases: {len(a)} and {len(b)} outcomes")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return Paired(only_a, only_b, sign_test(only_a, only_b))


def sign_test(successes: int, failures: int) -> float:
    """Two-sided exact binomial test of ``successes`` against ``failures`` at probability 1/2."""
    n = successes + failures
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(successes, failures) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
