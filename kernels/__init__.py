"""Kernels and their pure-torch references (``kvpipe.kernels``).

Every kernel has a torch reference that runs anywhere and is the ground truth in tests.
"""
from kvpipe.kernels.ragged import pack_ragged, unpack_ragged
from kvpipe.kernels.topk import keep_order, ranks, select_topk

__all__ = ["keep_order", "pack_ragged", "ranks", "select_topk", "unpack_ragged"]
