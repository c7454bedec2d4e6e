"""``kvpipe demo`` tells its story from measurements: every row is computed, none is written in."""
from __future__ import annotations

import re

import pytest

from kvpipe.eval.demo import PIPELINES, run_demo
from kvpipe.eval.protocol import Protocol


@pytest.mark.real_model
def test_the_demo_prints_one_row_per_cache_and_the_forks(smollm):
    model, tokenizer = smollm
    said: list[str] = []
    outcomes = run_demo(Protocol(model, tokenizer), context=256, cases=1, questions=2, say=said.append)
    assert list(outcomes) == ["full cache", *PIPELINES] and all(len(o) == 1 for o in outcomes.values())
    rows = [line for line in said if re.match(r"(full cache|default|int4|agnostic) +\d/1 ", line)]
    assert len(rows) == 4, said
    ratios = {line.split()[0]: float(re.search(r"([\d.]+)x", line)[1]) for line in rows if "x" in line}
    assert ratios["int4"] > 4 and ratios["agnostic"] > 2 and ratios["default"] > 1.5, ratios
    assert sum("fork" in line for line in said if line.startswith("  asked for")) == 2
