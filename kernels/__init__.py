"""Kernels and their pure-torch references (``kvpipe.kernels``).

Every kernel has a torch reference that runs anywhere and is the ground truth in tests.
"""
from kvpipe.kernels.ragged import concat_ragged, pack_ragged, select_ragged_rows, unpack_ragged
from kvpipe.kernels.topk import keep_order, ranks, select_topk

__all__ = ["concat_ragged", "keep_order", "pack_ragged", "ranks", "select_ragged_rows", "select_topk", "unpack_ragged"]
