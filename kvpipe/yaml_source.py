"""Load YAML safely while remembering where every key and value came from.

``yaml.safe_load`` forgets line numbers, so we compose the node tree ourselves (still with
the safe loader), record the start mark of every key path, and construct plain Python data.
Duplicate keys, which ``safe_load`` silently collapses, are an error here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvpipe.errors import SpecError

KeyPath = tuple  # e.g. ("stages", 1, "params", "window")


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
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise SpecError(f"YAML syntax error: {err.problem or err.context}", name,
                        mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
    source = YamlSource(None, name)
    if root is None:
        raise SpecError("the file is empty; a pipeline needs at least `version:` and `stages:`", name, 1, 1)
    _record(root, (), source)
    source.data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 — SafeLoader is safe_load
    return source


def read_source(spec: str | Path | dict) -> YamlSource:
    """A path, the name of a shipped pipeline (``"default"``), a YAML string or an already-parsed dict."""
    if isinstance(spec, dict):
        return YamlSource(spec)
    if isinstance(spec, str) and ("\n" in spec or ":" in spec):
        return load_yaml(spec, "<string>")
    path = Path(spec)
    if not path.is_file():
        from kvpipe import shipped

        path = shipped.path(spec)
        if not path.is_file():
            raise SpecError(f"no such pipeline file, and no shipped pipeline of that name ({', '.join(shipped.names())})",
                            str(spec))
    return load_yaml(path.read_text(), str(path))


def _record(node: yaml.Node, path: KeyPath, source: YamlSource) -> None:
    source.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                raise SpecError(f"duplicate key {key!r}", source.name, line, col, format_path(path + (key,)))
            seen.add(key)
            source.key_marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _record(value_node, path + (key,), source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(item, path + (i,), source)
