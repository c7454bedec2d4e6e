"""Reading what a file says about itself when the file may lie: JSON bounded before it is parsed, then a strict
schema. Used for saved caches (``runtime.cache_meta``) and gate files (``core.gate_file``); every refusal is a
``FileError`` naming the file and the field."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from kvpipe.errors import FileError

MAX_JSON_CHARS = 1 << 20          # what kvpipe writes is a few KB; 1 MB is generous
MAX_JSON_DEPTH = 8


def bounded_json(path: Path | str, field: str, text: str, max_depth: int = MAX_JSON_DEPTH,
                 max_chars: int = MAX_JSON_CHARS) -> object:
    """``text`` parsed, once it is known to be at most ``max_chars`` long and ``max_depth`` deep (the standard
    parser recurses: 100,000 brackets would end in a ``RecursionError``)."""
    if len(text) > max_chars:
        raise FileError(path, field, f"{len(text)} characters of JSON, more than kvpipe writes ({max_chars})")
    if json_depth(text) > max_depth:
        raise FileError(path, field, f"JSON nested deeper than {max_depth} levels; kvpipe writes none so deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileError(path, field, f"invalid JSON ({err})") from None


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text``, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def tensor_header(file) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype name, shape)}`` of an open ``safe_open`` file, from its header alone (no tensor is
    read), to check against what the file must hold before anything is allocated."""
    slices = {name: file.get_slice(name) for name in file.keys()}
    return {name: (part.get_dtype(), tuple(part.get_shape())) for name, part in slices.items()}


def validated(path: Path | str, schema: type[BaseModel], data: object, field: str = ""):
    """``data`` as an instance of ``schema``; the first problem refused with its field's dotted name."""
    if not isinstance(data, dict):
        raise FileError(path, field, f"expected a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in (field, *first["loc"]) if part != "") or "(top level)"
        value = first.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {str(value)[:60]!r})"
        raise FileError(path, where, f"{first['msg']}{shown}") from None
