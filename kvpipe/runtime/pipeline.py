"""``kvpipe.build(spec)`` → ``Pipeline``: the plan (``kvpipe.core.plan``) that can run on a model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvpipe.core.plan import Plan, validated
from kvpipe.runtime.attach import Handle

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Pipeline(Plan):
    def attach(self, model: PreTrainedModel, tokenizer=None) -> Handle:
        """Make ``model.generate()`` and forward calls use this pipeline until ``handle.detach()``. ``tokenizer``:
        the model's, for stages that feed the model text of their own (``reconstruction``'s repeat prompt)."""
        return Handle(self, model, tokenizer=tokenizer)


def build(spec: str | Path | dict) -> Pipeline:
    """Validate a pipeline (a YAML path, a YAML string or a dict) and build its stage graph.

    Raises ``SpecError`` with file, line and key path on any mistake, before any model is touched.
    """
    return validated(Pipeline, spec)
