"""What stages see: the per-layer ``Observation`` inside attention, and the ``CompressionContext`` after it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from kvpipe.core.budget import slots_per_head
from kvpipe.core.shards import LOCAL, HeadShards
from kvpipe.core.spec import Budget
from kvpipe.errors import BudgetError

# The most one block of a scoring transient may take (fp32): queries × keys per head for attention, rows × D_model
# per head for projections through W_O. Scoring runs after the prefill forward, beside the full cache; blocks this
# size keep it under the forward's own peak (benchmarks/bench_compress_memory.py).
BLOCK_BYTES = 32 << 20


class Stage(Protocol):
    """What the context reads of a stage (``kvpipe.core.registry.Stage``): its node id in the graph and, per slot
    it reads, the upstream stages that write it."""

    id: str
    sources: dict[str, list[str]]


@dataclass
class Observation:
    """One layer's attention inputs during a compressing forward.

    Shapes: ``query [B, Hq, q, D]`` (after RoPE), ``key``/``value [B, Hkv, kv, D]`` (everything attended,
    the ``q`` new tokens last), ``query_valid [B, q]`` and ``key_valid [B, Hkv, kv]`` (False = padding),
    ``out_proj [D_model, Hq * D]`` (the layer's output projection W_O, for value-aware scores).
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    query_valid: torch.Tensor
    key_valid: torch.Tensor
    out_proj: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # long [B, q]: RoPE positions of the queries
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None  # positions -> (cos, sin)
    shards: HeadShards = LOCAL             # the heads are this rank's share of the layer's (tensor parallelism)
    input_norm: torch.Tensor | None = None  # [B, q]: L2 norm of the layer's input per query (probe forwards only)

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def per_query_head(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, ...]`` -> ``[B, Hq, ...]``: each KV head repeated for the query heads that share it."""
        return x.repeat_interleave(self.groups, dim=1)

    def to_kv_heads(self, x: torch.Tensor, how: str = "mean") -> torch.Tensor:
        """``[B, Hq, ...]`` -> ``[B, Hkv, ...]``: combine the query heads of each KV head (``mean`` or ``max``)."""
        grouped = x.view(x.shape[0], self.key.shape[1], self.groups, *x.shape[2:])
        return grouped.mean(2) if how == "mean" else grouped.amax(2)

    def out_proj_per_head(self) -> torch.Tensor:
        """``W_O`` split by query head, fp32 ``[D_model, Hq, D]``."""
        if self.out_proj is None:
            raise RuntimeError("this layer exposes no output projection (o_proj); value-aware scores need it")
        return self.out_proj.float().view(-1, self.query.shape[1], self.query.shape[-1])

    def out_proj_gram(self) -> torch.Tensor:
        """``W_O^hᵀ W_O^h`` per query head h, fp32 ``[Hq, D, D]``: ``‖W_O^h x‖₂² = xᵀ G_h x``, so L2 sizes in the
        residual stream need no ``[B, Hq, n, D_model]`` tensor (8.6 GB at 32k tokens for a 1B model)."""
        weight = self.out_proj_per_head()
        return torch.einsum("mhd,mhe->hde", weight, weight)

    def projected_l1(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 [B, Hq, n]``: ``‖W_O^h x_i‖₁`` per query head h and row i of ``x [B, Hq, n, D]``. An L1 norm
        has no Gram form, so rows are projected a block at a time, each block's projection at most
        ``BLOCK_BYTES``."""
        weight = self.out_proj_per_head()                                              # [D_model, Hq, D]
        batch, heads, n, _ = x.shape
        rows = max(1, BLOCK_BYTES // (4 * batch * heads * weight.shape[0]))
        return torch.cat([torch.einsum("bhnd,mhd->bhnm", part.float(), weight).abs_().sum(-1)
                          for part in x.split(rows, dim=2)], dim=2)

    def projected_l2(self, x: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        """``float32 [B, Hq, n]``: ``‖W_O^h x_i‖₂`` per query head h and row i of ``x [B, Hq, n, D]``, from the Gram
        matrices (``gram``: ``out_proj_gram()`` if the caller has it). For ``x`` the values: the size of what each
        key's value writes into the residual stream through h."""
        gram = self.out_proj_gram() if gram is None else gram
        x = x.float()
        return torch.einsum("bhnd,hde,bhne->bhn", x, gram, x).clamp_min(0).sqrt()

    @cached_property
    def padded_keys(self) -> bool:
        """Whether some key is padding (read once: it is a host sync, and scoring asks per block of queries)."""
        return not bool(self.key_valid.all())

    def query_block(self) -> int:
        """Queries per block of a ``[B, Hq, block, kv]`` fp32 transient of at most ``BLOCK_BYTES``."""
        batch, heads = self.query.shape[:2]
        return max(1, BLOCK_BYTES // (4 * batch * heads * self.key.shape[2]))

    def attention_probs(self, start: int, stop: int) -> torch.Tensor:
        """Softmax attention of queries ``start:stop`` over all keys, fp32, ``[B, Hq, stop-start, kv]``.

        Causal and padding masks applied; rows of padding queries are all zero. Computed in place: the result is
        the only tensor of its size (callers take ``query_block()`` queries at a time).
        """
        q, kv = self.query.shape[2], self.key.shape[2]
        keys = self.per_query_head(self.key.float())
        probs = (self.query[:, :, start:stop].float() @ keys.transpose(-1, -2)).mul_(self.scaling)
        # causal: query start + i sees keys up to kv - q + start + i, so only the last q - start columns are masked
        future = torch.ones(stop - start, q - start, dtype=torch.bool, device=probs.device).triu(1)
        probs[..., kv - (q - start):].masked_fill_(future, float("-inf"))
        if self.padded_keys:
            probs.masked_fill_(~self.per_query_head(self.key_valid)[:, :, None, :], float("-inf"))
        probs.sub_(probs.amax(-1, keepdim=True)).exp_()
        probs.div_(probs.sum(-1, keepdim=True))
        return probs.nan_to_num_(0.0).mul_(self.query_valid[:, None, start:stop, None])   # all-masked rows: 0/0

    def max_attention(self, query_chunk: int | None = None, query_weight: torch.Tensor | None = None,
                      over_heads: bool = True) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``: per key, the largest softmax attention any query of its KV group gives it
        (what ``attention_probs`` then a maximum over queries and grouped heads gives, without materialising
        the normalised probabilities: ``max p = exp(max(logit − logsumexp))``, masks applied only where they
        can bite, queries read ``query_chunk`` at a time, default ``query_block()``). Padding queries give nothing.

        ``query_weight [B, q]`` (positive): each query's probabilities are multiplied by it before the maximum.
        ``over_heads=False``: the maximum over queries only, per query head, ``[B, Hkv, G, kv]``."""
        batch, q_heads, q, dim = self.query.shape
        kv_heads, kv = self.key.shape[1], self.key.shape[2]
        keys = self.key.float().transpose(-1, -2)[:, :, None]                       # [B, Hkv, 1, D, kv]
        best = torch.full((batch, kv_heads, *(() if over_heads else (self.groups,)), kv), float("-inf"),
                          device=self.query.device)
        log_weight = query_weight.float().log() if query_weight is not None else None
        query_chunk = query_chunk or self.query_block()
        for lo in range(0, q, query_chunk):
            hi = min(lo + query_chunk, q)
            queries = self.query[:, :, lo:hi].float().reshape(batch, kv_heads, self.groups, hi - lo, dim)
            logits = queries @ keys * self.scaling                                   # [B, Hkv, G, w, kv]
            # causal: query lo + i sees keys up to kv - q + lo + i, so only the last q - lo columns are masked
            tail = torch.ones(hi - lo, q - lo, dtype=torch.bool, device=logits.device).triu(1)
            logits[..., kv - (q - lo):].masked_fill_(tail, float("-inf"))
            if self.padded_keys:
                logits.masked_fill_(~self.key_valid[:, :, None, None, :], float("-inf"))
            logits.sub_(logits.logsumexp(-1, keepdim=True))
            if log_weight is not None:
                logits.add_(log_weight[:, None, None, lo:hi, None])
            live = self.query_valid[:, lo:hi]
            if not bool(live.all()):                                     # also clears rows with nothing to see
                logits.masked_fill_(~live[:, None, None, :, None], float("-inf"))
            best = torch.maximum(best, logits.amax((2, 3) if over_heads else 3))
        return best.exp()


@dataclass
class LayerView:
    """One layer's cache as stages see it: every stored slot, padded per (row, head) to ``n``.

    ``keys``/``values [B, Hkv, n, D]``; ``positions [B, Hkv, n]`` (logical token index);
    ``valid [B, Hkv, n]`` (False = padding or an empty slot of a shorter head).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


@dataclass
class Candidates:
    """One layer's `candidates` slot: ``protected`` slots are always kept; only ``eligible`` ones may be.
    Both ``bool [B, Hkv, n]``, protected ⊆ eligible."""

    protected: torch.Tensor
    eligible: torch.Tensor

    def narrowed(self, allowed: torch.Tensor) -> Candidates:
        """Only ``allowed`` slots stay eligible; protected ones stay protected (and so eligible)."""
        return Candidates(self.protected, (self.eligible & allowed) | self.protected)

    def protecting(self, slots: torch.Tensor) -> Candidates:
        """``slots`` protected (and so eligible) too."""
        return Candidates(self.protected | slots, self.eligible | slots)


@dataclass
class CompressionContext:
    """Everything one compression event works on; stages read and write ``slots[kind][layer]``."""

    layers: list[LayerView]
    budget: Budget | None
    seen_real: torch.Tensor                                      # long [B]: real tokens fed so far, per row
    slot_bytes: float                                              # bytes one kept token costs in the store
    full_slot_bytes: int                                           # ... in an uncompressed cache
    overhead_bytes: float = 0.0                                    # most a head holds beyond that (residual)
    strict: bool = False                                           # a budget protected slots exceed: error
    shortfall: int = 0                                             # slots kept beyond the budget (protected)
    observed_by: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    shards: HeadShards = LOCAL                                     # this rank's share of the KV heads
    slots: dict[str, list] = field(default_factory=dict)          # latest value of each slot
    by_stage: dict[str, dict[str, list]] = field(default_factory=dict)  # what each stage wrote
    # (keys, values [B, Hkv, n, D], positions, valid [B, Hkv, n], format) -> the keys and values a store of that
    # format gives back: the runtime's to compute (kvpipe.runtime.compressor sets it), what storage stages show
    # the stages after them
    preview: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def over_budget(self, message: str, slots: int) -> None:
        """Protected slots need ``slots`` more than the budget grants: an error under ``strict: true``; otherwise
        they are kept (a short prompt is not refused) and the shortfall is reported by ``handle.stats()``."""
        if self.strict:
            raise BudgetError(message + " (the pipeline says strict: true; without it the protected slots are kept "
                                        "and handle.stats() reports budget_met: false)")
        self.shortfall += slots

    def check_pooled(self, counts: torch.Tensor, total: torch.Tensor, where: str) -> None:
        """After a pooled allocation (``counts [B, U]`` of ``total [B]`` slots): report protected slots and floors
        that did not fit."""
        kept = self.shards.sum(counts.sum(-1))
        over = (kept - total).clamp_min(0)
        if bool((over > 0).any()):
            # one pool, one shortfall: counted by rank 0 only (stats() sums over ranks); every rank raises if strict
            self.over_budget(f"{where}: the budget grants {int(total.min())} slots but protected slots and per-head "
                             f"floors need {int(kept.max())}; raise the budget or lower the floor/window",
                             int(over.sum()) if self.shards.rank == 0 else 0)

    def write(self, stage: Stage, slot: str, per_layer: list) -> None:
        self.slots[slot] = per_layer
        self.by_stage.setdefault(stage.id, {})[slot] = per_layer

    def read(self, stage: Stage, slot: str) -> list | None:
        """``slot`` as written by the stage's nearest upstream writer (None for an optional read with none)."""
        sources = stage.sources.get(slot, [])
        return self.by_stage[sources[-1]][slot] if sources else None

    def read_all(self, stage: Stage, slot: str) -> list[list]:
        """``slot`` from every nearest upstream writer (for stages that merge, such as ``combine``)."""
        return [self.by_stage[source][slot] for source in stage.sources.get(slot, [])]

    def candidates(self, stage: Stage) -> list[Candidates]:
        """The upstream `candidates` per layer; without a candidate stage nothing is protected, all is eligible."""
        found = self.read(stage, "candidates")
        if found is not None:
            return found
        return [Candidates(torch.zeros_like(view.valid), view.valid.clone()) for view in self.layers]

    def observed(self, stage: Stage) -> list[torch.Tensor]:
        """What ``stage.observe`` returned for each layer."""
        got = self.observed_by.get(stage.id, [])
        if len(got) != len(self.layers):
            raise RuntimeError(f"stage {stage.id!r} observed {len(got)} of {len(self.layers)} layers; "
                               "was the compressing forward run through the attached model?")
        return got

    def slots_per_head(self) -> torch.Tensor:
        """``long [B]``: the budget read uniformly per head, relative to the real tokens seen by each row
        (not to the slots still held, so repeated compressions do not shrink the cache geometrically)."""
        if self.budget is None:
            raise RuntimeError("this pipeline has no budget; add `budget:` to the spec")
        return slots_per_head(self.budget, self.seen_real, self.slot_bytes, self.full_slot_bytes, self.overhead_bytes)
