"""The pipelines shipped with kvpipe: YAML files in ``pipelines/`` (installed as ``kvpipe/pipelines``)."""
from __future__ import annotations

import importlib
from pathlib import Path

# the package's folder: the top-level pipelines/ of a checkout, kvpipe/pipelines in an install
DIR = Path(importlib.import_module("kvpipe.pipelines").__path__[0])


def path(name: str) -> Path:
    """``path("default")`` -> the shipped ``default.yaml``."""
    return DIR / f"{name.removesuffix('.yaml')}.yaml"


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.yaml"))
