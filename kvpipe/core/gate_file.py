"""Gate files as untrusted input: what one says about itself is checked before anything is built from it.

A gate file is safetensors: the gates' fp32 weights, and as metadata their ``shape`` (layers, KV heads, head
dimension, hidden width, shared readout) and a ``record`` of their training (``learned.train.record``). Its
metadata is bounded and validated by the schemas below; its tensors' names, dtypes and shapes are compared, from
the header alone, with the parameters that ``shape`` implies (worked out on the meta device: nothing allocated),
so the gates built afterwards are never larger than the file. Refusals are ``FileError``s naming the file and
the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import ConfigDict, Field
from safetensors import SafetensorError, safe_open

from kvpipe.core.spec import StrictModel
from kvpipe.core.untrusted import bounded_json, tensor_header, validated
from kvpipe.errors import FileError


class GateShape(StrictModel):
    layers: int = Field(ge=1, le=1024)
    heads: int = Field(ge=1, le=1024, description="KV heads per layer")
    head_dim: int = Field(ge=1, le=4096)
    hidden: int = Field(ge=1, le=8192)
    shared: bool = True


class GateRecord(StrictModel):
    """What kvpipe reads of the training record; the rest (losses, data, settings) is kept as written."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    target: Literal["kl", "reconstruction"] = "kl"


def read_gate_file(path: Path, parameter_shapes: Callable[..., dict[str, tuple[int, ...]]]
                   ) -> tuple[GateShape, GateRecord, dict[str, torch.Tensor]]:
    """``(shape, record, tensors)`` of the gate file at ``path``, every part checked; ``parameter_shapes(**shape)``
    names the gates' parameters and their shapes (``RetentionGates.parameter_shapes``)."""
    try:
        with safe_open(str(path), "pt") as file:
            meta = file.metadata() or {}
            if "shape" not in meta:
                raise FileError(path, "shape", "missing: not a kvpipe retention gate file")
            shape = validated(path, GateShape, bounded_json(path, "shape", meta["shape"]), "shape")
            record = validated(path, GateRecord, bounded_json(path, "record", meta.get("record", "{}")), "record")
            expected = parameter_shapes(**shape.model_dump())
            header = tensor_header(file)
            if missing := sorted(expected.keys() - header.keys()):
                raise FileError(path, missing[0], f"missing: gates of this shape have {len(expected)} tensors")
            if extra := sorted(header.keys() - expected.keys()):
                raise FileError(path, extra[0], "not a tensor of retention gates of this shape")
            for name, size in expected.items():
                if header[name] != ("F32", size):
                    raise FileError(path, name, f"{header[name][0]} {list(header[name][1])} where the shape metadata "
                                                f"needs F32 {list(size)}")
            tensors = {name: file.get_tensor(name) for name in expected}
    except (OSError, SafetensorError) as err:
        raise FileError(path, "", f"not a valid kvpipe retention gate file ({str(err).splitlines()[0]}); "
                                  "train one with `kvpipe train-gates`") from None
    if bad := next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None):
        raise FileError(path, bad, "holds NaN or inf weights; retrain the gates")
    return shape, record, tensors
