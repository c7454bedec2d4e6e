"""Which KV heads one process holds, and how it agrees with the processes holding the others.

Under tensor parallelism (transformers' ``tp_plan``) every rank of the model's process group holds a contiguous
block of each layer's KV heads: rank ``r`` of ``world`` holds heads ``[r·h, (r+1)·h)`` of every layer, ``h`` the
heads per rank. Whatever needs all heads of a layer or of the model (pooled budgets, layer-wide calibration,
statistics) goes through the few collectives below, on that group. ``LOCAL`` is the one-process case: the same
calls, no traffic, so a stage has one code path.

Every collective adds what this rank sent to ``sent_bytes`` (the payload, not the transport's own overhead), so
a compression's traffic can be reported.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch

from kvpipe.errors import KVPipeError

# seconds a rank waits in one of kvpipe's collectives for the others (a dead or stuck rank must not hang the rest)
COLLECTIVE_TIMEOUT = float(os.environ.get("KVPIPE_COLLECTIVE_TIMEOUT", "600"))


class PeerFailure(KVPipeError):
    """Another tensor-parallel rank failed inside a block the ranks agree on (``HeadShards.agreeing``)."""


@dataclass(eq=False)            # identity: a group handle, not a value (and a valid dataclass default)
class HeadShards:
    """This process's share of the model's KV heads; ``group`` None = one process holds them all."""

    group: Any = None                 # a torch.distributed ProcessGroup
    rank: int = 0
    world: int = 1
    sent_bytes: int = 0
    timeout: float = COLLECTIVE_TIMEOUT
    agreeing_on: str | None = field(default=None, repr=False)     # the block the ranks agree on, if one runs

    @property
    def split(self) -> bool:
        return self.world > 1

    def heads(self, local: int) -> slice:
        """This rank's KV heads among the model's, when it holds ``local`` of each layer's."""
        return slice(self.rank * local, (self.rank + 1) * local)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over ranks (a new tensor)."""
        return self._reduce(x, "SUM")

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, "MAX")

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, "MIN")

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order (same shape on every rank)."""
        if not self.split:
            return x
        import torch.distributed as dist

        self._peers_alive()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._wait(dist.all_gather(parts, x.contiguous(), group=self.group, async_op=True))
        self.sent_bytes += x.numel() * x.element_size()
        return torch.cat(parts, dim)

    def barrier(self) -> None:
        if self.split:
            import torch.distributed as dist

            self._wait(dist.barrier(group=self.group, async_op=True))

    # --- agreeing on faults --------------------------------------------------------------------------------
    # Inside an ``agreeing`` block every collective is preceded by a flag exchange, and a rank that fails sends
    # its flag instead of going on: the others receive it in their next exchange (at their next collective, or at
    # the block's end), raise ``PeerFailure``, and every rank has run the same collectives when the block ends.
    # No rank waits for a collective the others never join, none mixes up two collectives, and the group stays
    # usable for the next forward.
    @contextmanager
    def agreeing(self, what: str) -> Iterator[None]:
        """Run the block on every rank and agree on its outcome: if it raises on any rank, every rank raises (that
        rank its own error, the others a ``PeerFailure`` naming it). In one process: just the block."""
        if not self.split or self.agreeing_on is not None:        # nested: the outer block agrees
            yield
            return
        self.agreeing_on = what
        try:
            yield
        except PeerFailure:
            raise                              # told by another rank: every rank knows already
        except BaseException:
            self._exchange(failed=True)
            raise
        else:
            self._exchange(failed=False)
        finally:
            self.agreeing_on = None

    def _peers_alive(self) -> None:
        if self.agreeing_on is not None:
            self._exchange(failed=False)

    def _exchange(self, failed: bool) -> None:
        """Tell every rank whether this one failed; raise ``PeerFailure`` here if another did."""
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        first = torch.tensor([self.rank if failed else self.world], device=device)
        self._wait(dist.all_reduce(first, dist.ReduceOp.MIN, group=self.group, async_op=True))
        if not failed and int(first) < self.world:
            what, self.agreeing_on = self.agreeing_on, None
            raise PeerFailure(f"rank {int(first)} of {self.world} failed while {what} (its own error says why); "
                              f"rank {self.rank} stopped with it")

    def _wait(self, work) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as err:
            raise KVPipeError(f"rank {self.rank} of {self.world} waited {self.timeout:g} s for the other ranks in a "
                              f"kvpipe collective ({str(err).splitlines()[0] if str(err) else 'timed out'}); a rank "
                              "died or is stuck. KVPIPE_COLLECTIVE_TIMEOUT sets the wait") from None

    def _reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        out = x.clone()
        if self.split:
            import torch.distributed as dist

            self._peers_alive()
            self._wait(dist.all_reduce(out, getattr(dist.ReduceOp, op), group=self.group, async_op=True))
            self.sent_bytes += out.numel() * out.element_size()
        return out


LOCAL = HeadShards()
