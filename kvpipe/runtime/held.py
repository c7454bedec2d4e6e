"""Every byte a cache keeps alive: the storage of each tensor reachable from it, each storage counted once.

``kv_bytes`` (``cache.cache_bytes``) counts the key/value content a cache holds: stores, tails, positions and
lengths. A cache also keeps what it derived from them to run fast (per-slot destinations of a padded layout,
validity masks, the decode kernel's run starts and split buffers, the dequantization workspace). ``held_bytes``
counts all of it, found by walking the cache's objects, so that nothing a store caches can escape the count.
"""
from __future__ import annotations

import threading
from typing import Iterator

import torch


def reachable_tensors(root: object) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes (cached properties included), dataclass fields and
    containers; each object visited once."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type, threading.local)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())


def held_bytes(root: object) -> int:
    """Bytes of the distinct storages behind every tensor reachable from ``root`` (a view counts its whole
    storage, two views of one storage count it once)."""
    storages = {}
    for tensor in reachable_tensors(root):
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
