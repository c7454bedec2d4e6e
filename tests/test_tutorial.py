"""``docs/write-a-stage.md`` runs as written: its code blocks, in order, in one namespace."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from kvpipe.core.registry import all_stages

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "write-a-stage.md"


def test_the_write_a_stage_tutorial_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(TUTORIAL), "exec"), namespace)
    assert "small_keys" in all_stages()
    assert all(layer.kept_slots().eq(16).all() for layer in namespace["cache"].layers)
    assert "small_keys" in capsys.readouterr().out
    # the stage does what the tutorial says: per head, the 16 keys of smallest L1 norm stay
    cache, keys = namespace["KVPipeCache"](1), torch.randn(1, 2, 64, 16)
    cache.update(keys, torch.randn(1, 2, 64, 16), 0)
    namespace["compress"](namespace["pipeline"], cache)
    smallest = keys.abs().sum(-1).argsort(-1)[..., :16].sort(-1).values
    assert torch.equal(cache.layers[0].store.padded()[2], smallest)
