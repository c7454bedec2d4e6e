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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from kvpipe.errors import KVPipeError


@dataclass(eq=False)            # identity: a group handle, not a value (and a valid dataclass default)
class HeadShards:
    """This process's share of the model's KV heads; ``group`` None = one process holds them all."""

    group: Any = None                 # a torch.distributed ProcessGroup
    rank: int = 0
    world: int = 1
    sent_bytes: int = 0

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

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self.sent_bytes += x.numel() * x.element_size()
        return torch.cat(parts, dim)

    def barrier(self) -> None:
        if self.split:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    @contextmanager
    def agreeing(self, what: str) -> Iterator[None]:
        """Run the block on every rank and agree on its outcome: if it raised on any rank, every rank raises (that
        rank its own error, the others a ``KVPipeError`` naming it), so no rank goes on alone into a collective the
        others never join. One all-reduce of a flag; nothing in one process."""
        try:
            yield
        except BaseException:
            self.agree(failed=True, what=what)
            raise
        self.agree(failed=False, what=what)

    def agree(self, failed: bool, what: str) -> None:
        """Tell every rank whether this one failed at ``what``; raise here if another did (``failed`` ranks
        return: they raise their own error)."""
        if not self.split:
            return
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        first = torch.tensor([self.rank if failed else self.world], device=device)
        dist.all_reduce(first, dist.ReduceOp.MIN, group=self.group)
        if not failed and int(first) < self.world:
            raise KVPipeError(f"rank {int(first)} of {self.world} failed while {what} (its own error says why); "
                              "this rank stopped with it")

    def _reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        out = x.clone()
        if self.split:
            import torch.distributed as dist

            dist.all_reduce(out, getattr(dist.ReduceOp, op), group=self.group)
            self.sent_bytes += out.numel() * out.element_size()
        return out


LOCAL = HeadShards()
