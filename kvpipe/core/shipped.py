"""The pipelines shipped with kvpipe: YAML files in ``pipelines/`` (installed as ``kvpipe/pipelines``)."""
from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).parents[1] / "pipelines"


def path(name: str) -> Path:
    """``path("default")`` -> the shipped ``default.yaml``."""
    return DIR / f"{name.removesuffix('.yaml')}.yaml"


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.yaml"))
