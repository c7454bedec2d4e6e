"""Load YAML safely while remembering where every key and value came from.

``yaml.safe_load`` forgets line numbers, so we compose the node tree ourselves (still with
the safe loader), record the start mark of every key path, and construct plain Python data.
Duplicate keys, which ``safe_load`` silently collapses, are an error here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvpipe.core import shipped
from kvpipe.errors import SpecError

KeyPath = tuple  # e.g. ("stages", 1, "params", "window")
MAX_NODES = 10_000  # a pipeline has a few dozen; aliases can make a 400-byte file expand exponentially


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``
    and would hand the string ``"1e-3"`` to the spec)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


@dataclass
class YamlSource:
    """Parsed YAML data plus ``(line, column)`` (1-based) of each key path."""

    data: Any
    name: str = "<dict>"
    marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)      # where each value starts
    key_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)  # where each mapping key starts

    def locate(self, path: KeyPath, at_key: bool = False) -> tuple[int | None, int | None]:
        """Mark of the value at ``path`` (of its key with ``at_key``); a missing path gets its nearest parent's."""
        path = tuple(path)
        if at_key and path in self.key_marks:
            return self.key_marks[path]
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path, (None, None))

    def error(self, path: KeyPath, message: str, at_key: bool = False) -> SpecError:
        line, column = self.locate(path, at_key)
        return SpecError(message, self.name, line, column, format_path(path))


def format_path(path: KeyPath) -> str:
    """``("stages", 1, "params", "w")`` -> ``stages[1].params.w``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml(text: str, name: str) -> YamlSource:
    try:
        root = yaml.compose(text, Loader=Loader)
    except yaml.MarkedYAMLError as err:
        raise _located(err, "YAML syntax error", name) from None
    source = YamlSource(None, name)
    if root is None:
        raise SpecError("the file is empty; a pipeline needs at least `version:` and `stages:`", name, 1, 1)
    _record(root, (), source, [0])
    try:
        source.data = Loader(text).get_single_data()   # the safe loader: tags never construct Python objects
    except yaml.constructor.ConstructorError as err:
        raise _located(err, "unsupported YAML tag (pipelines hold plain mappings, lists, strings and numbers)",
                       name) from None
    return source


def _located(err: yaml.MarkedYAMLError, what: str, name: str) -> SpecError:
    mark = err.problem_mark or err.context_mark
    detail = (err.problem or err.context or "").split(" for the tag ")[-1]
    return SpecError(f"{what}: {detail}", name, mark.line + 1 if mark else None, mark.column + 1 if mark else None)


def read_source(spec: str | Path | dict) -> YamlSource:
    """A path, the name of a shipped pipeline (``"default"``), a YAML string or an already-parsed dict."""
    if isinstance(spec, dict):
        return YamlSource(spec)
    if isinstance(spec, str) and ("\n" in spec or ":" in spec):
        return load_yaml(spec, "<string>")
    path = Path(spec)
    if not path.is_file():
        path = shipped.path(str(spec))
        if not path.is_file():
            known = ", ".join(shipped.names())
            raise SpecError(f"no such pipeline file, and no shipped pipeline of that name ({known})", str(spec))
    return load_file(path)


def load_file(path: Path) -> YamlSource:
    """``load_yaml`` of a file, which must be UTF-8 text."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"not UTF-8 text (byte {err.start}); save the file as UTF-8", str(path)) from None
    return load_yaml(text, str(path))


def _record(node: yaml.Node, path: KeyPath, source: YamlSource, visited: list[int]) -> None:
    where = (node.start_mark.line + 1, node.start_mark.column + 1)
    visited[0] += 1
    if visited[0] > MAX_NODES:
        raise SpecError(f"more than {MAX_NODES:,} values once aliases are expanded; a pipeline needs a few dozen",
                        source.name, *where, format_path(path))
    source.marks[path] = where
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError("a key must be a plain name, not a list or mapping", source.name,
                                key_node.start_mark.line + 1, key_node.start_mark.column + 1, format_path(path))
            key = key_node.value
            if key in seen:
                line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                raise SpecError(f"duplicate key {key!r}", source.name, line, col, format_path(path + (key,)))
            seen.add(key)
            source.key_marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _record(value_node, path + (key,), source, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(item, path + (i,), source, visited)
