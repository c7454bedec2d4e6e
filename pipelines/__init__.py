"""Ready-made pipelines shipped with kvpipe (``kvpipe.pipelines``)."""
from pathlib import Path

DIR = Path(__file__).parent


def path(name: str) -> Path:
    """``path("default")`` -> the shipped ``default.yaml``."""
    return DIR / f"{name.removesuffix('.yaml')}.yaml"
