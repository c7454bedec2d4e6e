"""A benchmark spread over processes (``torchrun --nproc-per-node N -m kvpipe bench``, or ``accelerate launch``).

The cases of a suite are dealt out deterministically: the ``u``-th unit of work (one context length, task,
protocol and case group, in the order a single process runs them) goes to rank ``u mod N``. Each rank writes its
own ``results.rank{r}.jsonl``; after a barrier rank 0 merges them back into the single-process order, so the same
seed gives the same per-case records whatever ``N`` is. The processes only meet at that barrier (gloo, on the host,
so it works beside any GPU): no tensors travel between them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpipe.models import launched_by_torchrun


@dataclass(frozen=True)
class Shard:
    """This process's share of a benchmark: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    def takes(self, unit: int) -> bool:
        return unit % self.world == self.rank

    def records_file(self, out_dir: Path) -> Path:
        return out_dir / ("results.jsonl" if self.world == 1 else f"results.rank{self.rank}.jsonl")


def launched() -> Shard:
    """The shard of a process started by ``torchrun``/``accelerate launch`` (their ``RANK`` and ``WORLD_SIZE``),
    its process group opened; one process otherwise."""
    if launched_by_torchrun()[1] == 1:
        return Shard()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def agreed(text: str, shard: Shard) -> str:
    """Rank 0's ``text`` on every rank (an output folder named after the time, say)."""
    if shard.world == 1:
        return text
    import torch.distributed as dist

    encoded = torch.tensor(list(text.encode()), dtype=torch.uint8, device="cpu")      # gloo: on the host
    length = torch.tensor([encoded.numel()], device="cpu")
    dist.broadcast(length, 0)
    buffer = encoded if shard.rank == 0 else torch.empty(int(length), dtype=torch.uint8, device="cpu")
    dist.broadcast(buffer, 0)
    return bytes(buffer.tolist()).decode()


def wait_for_all(shard: Shard) -> None:
    if shard.world > 1:
        import torch.distributed as dist

        dist.barrier()


def close(shard: Shard) -> None:
    """Close the process group before the interpreter exits (gloo torn down at exit can abort the process)."""
    import torch.distributed as dist

    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def merged(out_dir: Path, world: int, unit_of) -> list[dict]:
    """Every rank's records in single-process order: rank 0's environment and skipped contenders, then the task
    records by ``unit_of(record)`` (ties keep their file order), then the other records (fidelity, finished: the
    slowest rank's seconds). Writes them to ``out_dir/results.jsonl``."""
    per_rank = [[json.loads(line) for line in Shard(r, world).records_file(out_dir).read_text().splitlines()]
                for r in range(world)]
    first = per_rank[0]
    head = [dict(first[0], ranks=world), *(r for r in first if r["kind"] == "skipped")]
    tasks = sorted((r for records in per_rank for r in records if r["kind"] == "task"), key=unit_of)
    rest = [r for r in first if r["kind"] not in ("environment", "skipped", "task", "finished")]
    finished = {"kind": "finished", "seconds": max(r["seconds"] for records in per_rank for r in records
                                                   if r["kind"] == "finished")}
    records = [*head, *tasks, *rest, finished]
    with open(out_dir / "results.jsonl", "w") as sink:
        sink.writelines(json.dumps(record) + "\n" for record in records)
    return records
