"""Whether Triton kernels run in Triton's CPU interpreter (no triton import: torch-only installs use this too)."""
import os


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU, slowly, for tests (Triton reads it when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
