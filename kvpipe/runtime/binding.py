"""How an attach drives the caches it made: ``Binding``, a few flags its hooks set (no model, no session), the
forward flags per thread (``PerThread``). A cache checks them to refuse forwards that are not the attached model's
and to know when attention reads its quantized stores itself."""
from __future__ import annotations

import threading

from kvpipe.errors import UnsupportedModelError


class PerThread:
    """A flag of the forward running in the calling thread: forwards on two caches may run at once in two threads
    (each thread's hooks, attention and cache updates run in that thread), and neither may see the other's."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, binding, owner=None):
        return self if binding is None else getattr(binding.threads, self.name, False)

    def __set__(self, binding, value: bool) -> None:
        setattr(binding.threads, self.name, value)


class Binding:
    """How an attach drives the caches it made, as flags its hooks set (no model, no session). ``attached`` is the
    attach's; the forward flags are per thread (``PerThread``)."""

    forward_running = PerThread()    # the attached decoder's forward is running
    fused_decode = PerThread()       # this forward's one-token attention reads quantized stores itself
    static_decode = PerThread()      # this forward's one-token updates may write into static tails (none observes)

    def __init__(self, model_name: str, identity: dict | None = None, attached: bool = True):
        self.model_name = model_name         # for messages
        self.identity = identity             # the model's (``runtime.model_identity``): what saved caches record
        self.attached = attached
        self.threads = threading.local()

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "threads"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, threads=threading.local())

    def check(self) -> None:
        if not self.attached:
            raise UnsupportedModelError("this cache belongs to a kvpipe handle that was detached; "
                                        "create a new cache (or attach again) to keep generating")
        if not self.forward_running:       # the attached decoder's pre-hook did not run: another model's forward
            raise UnsupportedModelError(
                f"this cache belongs to the pipeline attached to a {self.model_name}, but a forward that is not "
                "that model's is filling it; use handle.cache() only with the model it came from")
