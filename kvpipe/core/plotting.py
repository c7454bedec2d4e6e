"""The one way kvpipe opens matplotlib: headless, and a clear error when the optional extra is missing."""
from __future__ import annotations

from kvpipe.errors import KVPipeError


def pyplot(what: str = "plots"):
    """``matplotlib.pyplot`` on the Agg backend (files, no window); ``KVPipeError`` naming the fix if absent."""
    try:
        import matplotlib
    except ImportError:
        raise KVPipeError(f"{what} need matplotlib: pip install 'kvpipe[plot]' (or pass --no-plots where the "
                          "command has it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
