"""``Pipeline.attach(model)``: hooks and attention function that put a pipeline on a model, and the ``Handle``.

* a forward pre-hook on the decoder adopts (or creates) the cache and records the 2D padding mask;
* the kvpipe attention function observes queries and masks compressed layers per head;
* a forward hook on the decoder compresses every layer once all layers have been observed.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpipe.core.context import Observation
from kvpipe.core.plan import Plan
from kvpipe.errors import UnsupportedModelError
from kvpipe.runtime import compressor, probe
from kvpipe.runtime.adapters import (
    attention_modules,
    base_attention_function,
    cache_keyword,
    check_model,
    find_decoder,
    output_projection,
    rope_tables,
)
from kvpipe.runtime.attention import register_attention
from kvpipe.runtime.backend import resolve_backend
from kvpipe.runtime.binding import Binding
from kvpipe.runtime.cache import KVPipeCache, KVPipeLayer, Storage, cache_bytes, reserved_bytes
from kvpipe.runtime.held import held_bytes
from kvpipe.runtime.layout import plan_layout
from kvpipe.runtime.model_identity import model_identity
from kvpipe.runtime.parallel import head_shards
from kvpipe.runtime.stats import Stats, bytes_by_role, uncompressed_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers' own layers an empty DynamicCache may hold (generate() makes one from the model's config)
PLAIN_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def is_state_layer(layer) -> bool:
    """A linear-attention (or convolution) state layer of transformers' DynamicCache (5.25 has them)."""
    return type(layer).__name__ in ("LinearAttentionLayer", "DummyLayer")


@dataclass
class ForwardState:
    """What one forward call of the attached decoder works with."""

    cache: KVPipeCache
    padding: torch.Tensor | None          # 2D mask [B, seen] (1 = real token), None = no padding
    compressing: bool                     # the trigger fires: observe now, compress after the forward
    observing: bool = False               # stages observe this forward (it compresses, or it is a probe)
    ids: torch.Tensor | None = None       # long [B, q]: its input ids (None when given embeddings)
    started: float = 0.0                  # perf_counter() when it began
    sent_bytes: int = 0                   # the shards' sent_bytes when it began (observers may communicate)
    observed: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    fault: BaseException | None = None    # an observation that failed on this rank (tensor parallelism: held back
                                          # until the ranks agree, so the model's own collectives stay matched)


class Session:
    """The live link between one pipeline and one model (shared by the handle, hooks and caches)."""

    def __init__(self, pipeline: Plan, model: PreTrainedModel, tokenizer=None):
        self.pipeline, self.model = pipeline, model
        # probing stages' prompts are encoded now, so a missing tokenizer fails at attach, not mid-generate
        self.probe_prompts = {stage.id: stage.prompt_ids(tokenizer) for stage in pipeline.probers}
        self.threads = threading.local()                # per-forward state: each thread runs its own forwards
        self.decoder = find_decoder(model)
        self.base = model.config._attn_implementation
        self.last_cache: KVPipeCache | None = None  # kept so stats() works after generate() returns
        self.base_attention = base_attention_function(self.base, self.decoder)
        self.backend = resolve_backend(pipeline.spec.backend, next(model.parameters()).device)
        self.layout = plan_layout(pipeline, model, self.backend)      # which layers kvpipe compresses
        storage = pipeline.storage_stage
        if self.backend == "triton" and storage is not None and storage.params.rotate != "none":
            raise UnsupportedModelError(
                f"stage {storage.id!r} stores rotated codes (rotate: {storage.params.rotate}), which the fused Triton "
                "kernels do not read yet; set backend: torch")
        if self.backend == "triton" and any(hasattr(attention, "sinks") for attention in attention_modules(model)):
            raise UnsupportedModelError(
                f"{type(model).__name__} adds attention sinks to every softmax, which the fused Triton decode kernel "
                "does not compute; set backend: torch (its attention is the model's own, sinks included)")
        # the caches' view of this attach
        self.binding = Binding(type(model).__name__, model_identity(model), attached=False)
        self.cache_kwarg = cache_keyword(self.decoder)
        self.rope = rope_tables(model)                  # (x, positions) -> (cos, sin), for stages that rotate
        self.shards = head_shards(model)                # one process's heads, or a tensor-parallel rank's

    @property
    def attached(self) -> bool:
        return self.binding.attached

    # What the forward running in this thread works with: two threads may run forwards on two caches at once.
    @property
    def active(self) -> ForwardState | None:
        return getattr(self.threads, "active", None)

    @active.setter
    def active(self, forward: ForwardState | None) -> None:
        self.threads.active = forward

    @property
    def probing(self) -> probe.Probe | None:
        """The probe whose forward runs in this thread, if any."""
        return getattr(self.threads, "probing", None)

    @probing.setter
    def probing(self, running: probe.Probe | None) -> None:
        self.threads.probing = running

    # --- hooks ----------------------------------------------------------------------------------
    def before_forward(self, module, args, kwargs):
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self.model.config.use_cache
        cache = kwargs.pop("past_key_values", None) if self.cache_kwarg == "cache" else None
        cache = kwargs.get(self.cache_kwarg) if cache is None else cache
        if not use_cache and cache is None:
            self.active = None
            return args, kwargs
        cache = self.adopt(cache)
        kwargs[self.cache_kwarg] = cache
        padding = kwargs.get("attention_mask")
        if padding is not None and padding.dim() != 2:
            raise UnsupportedModelError("kvpipe needs the usual 2D attention mask (1 = token, 0 = padding); "
                                        f"got a {padding.dim()}D mask")
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        tokens = ids if ids is not None else kwargs.get("inputs_embeds")
        probing = self.probing is not None
        compressing = not probing and self.fires(cache, tokens.shape[1])
        self.active = ForwardState(cache, padding, compressing, compressing or probing,
                                   ids if ids is not None and not ids.is_floating_point() else None,
                                   time.perf_counter(), self.shards.sent_bytes)
        self.binding.forward_running = True
        # observers need padded keys, so an observed forward reads stores through the padded path
        self.binding.fused_decode = self.backend == "triton" and not self.active.observing
        self.binding.static_decode = not self.active.observing
        if not probing:
            self.last_cache = cache
        return args, kwargs

    def after_forward(self, module, args, kwargs, output):
        forward, self.active = self.active, None
        self.binding.forward_running = self.binding.fused_decode = self.binding.static_decode = False
        if forward is not None and forward.fault is not None and self.probing is not None:
            raise forward.fault            # a probe's forward runs inside the compression the ranks agree on
        if forward is not None and self.probing is None:
            # The cache is largest now, before compression; chunked prefill and decode triggers keep this low.
            forward.cache.peak_bytes = max(forward.cache.peak_bytes, cache_bytes(forward.cache))
            # Storage is not differentiable (codes, kept sets): a forward with gradients on still compresses
            # its cache, and no graph reaches into it.
            with torch.no_grad():
                forward.cache.release_cut_windows()         # before a bytes budget counts them
                if forward.compressing or forward.fault is not None:
                    # every rank compresses, or every rank raises: a fault on one must not leave the others
                    # waiting in a collective (kvpipe.core.shards)
                    with self.shards.agreeing("compressing the cache"):
                        if forward.fault is not None:
                            raise forward.fault
                        self.finish(forward)
                for layer in forward.cache.compressed_layers:
                    layer.settle()
        return output

    @torch.no_grad()
    def observe(self, forward: ForwardState, module, query, key, value, scaling, position_ids) -> None:
        layer_idx = module.layer_idx
        batch, _, q, _ = query.shape
        padding = forward.padding
        query_valid = padding[:, -q:].bool() if padding is not None else query.new_ones(batch, q, dtype=torch.bool)
        key_valid = forward.cache.layers[layer_idx].slot_valid(padding)
        out_proj = output_projection(module)
        rope = self.rope
        positions = position_ids.expand(batch, -1) if position_ids is not None else None
        obs = Observation(layer_idx, query, key, value, scaling or query.shape[-1] ** -0.5, query_valid, key_valid,
                          out_proj, positions, (lambda p: rope(query, p)) if rope is not None else None,
                          self.shards)
        if forward.fault is not None:   # this rank failed on an earlier layer: it only joins the forward's end
            return
        try:
            self.record(forward, obs)
        except Exception as err:
            if not self.shards.split:
                raise
            # a rank's fault waits for the forward's end (after_forward raises it on every rank): the other ranks
            # are in the model's collectives, which this rank must join
            forward.fault = err

    # --- what a compressing forward does; a recording session (kvpipe.runtime.capture) does otherwise ----
    def fires(self, cache: KVPipeCache, new_tokens: int) -> bool:
        """Whether this forward, adding ``new_tokens``, observes and then compresses (a model without a layer to
        compress: never)."""
        compressed = cache.compressed_layers
        return bool(compressed) and self.pipeline.fires(compressed[0].seen, compressed[0].since_compression,
                                                        new_tokens)

    def record(self, forward: ForwardState, obs: Observation) -> None:
        """Keep what the pipeline's stages observe of one layer's attention (a probe's forward: the probe)."""
        if self.probing is not None:
            self.probing.record(obs)
            return
        for stage_id, recorded in compressor.observe(self.pipeline, obs).items():
            forward.observed.setdefault(stage_id, {})[obs.layer_idx] = recorded

    def finish(self, forward: ForwardState) -> None:
        """After a compressing forward: probe (if a stage does), then run the pipeline over the cache."""
        forward.cache.compressing_forward_seconds += time.perf_counter() - forward.started
        forward.cache.collective_bytes += self.shards.sent_bytes - forward.sent_bytes      # what observers sent
        observed = forward.observed
        if self.pipeline.probers:
            observed = {**observed, **probe.run(self, forward)}
        compressor.compress(self.pipeline, forward.cache, forward.padding, observed)

    # --- caches ---------------------------------------------------------------------------------
    def new_cache(self) -> KVPipeCache:
        return KVPipeCache(self.layout.fresh_layers(), Storage(self.backend), self.binding, self.shards)

    def adopt(self, cache) -> KVPipeCache:
        """Our own cache as is; an empty plain ``DynamicCache`` (what ``generate()`` makes) converted."""
        if cache is None:
            return self.new_cache()
        if isinstance(cache, KVPipeCache):
            if cache.binding is not self.binding:
                raise UnsupportedModelError("this cache was made by another kvpipe handle; use handle.cache()")
            return cache
        plain = type(cache) is DynamicCache and all(type(layer) in PLAIN_LAYERS or is_state_layer(layer)
                                                    for layer in cache.layers)
        if not plain or getattr(cache, "offloading", False):
            raise UnsupportedModelError(
                f"kvpipe cannot adopt a {type(cache).__name__}: it manages its own storage and quantization. "
                "Pass no cache (generate() makes one), an empty DynamicCache, or handle.cache()")
        if cache.get_seq_length() > 0:
            raise UnsupportedModelError("kvpipe cannot adopt a DynamicCache that already holds tokens: it was "
                                        "filled without the pipeline. Start from an empty cache or handle.cache()")
        cache.__class__ = KVPipeCache  # generate() keeps a reference to this very object
        cache.bind(self.layout.fresh_layers(), Storage(self.backend), self.binding, self.shards)
        return cache


class Handle:
    """What ``attach()`` returns. Also a context manager: ``with pipeline.attach(model) as handle: ...``."""

    def __init__(self, pipeline: Plan, model: PreTrainedModel, session_type: type[Session] = Session,
                 tokenizer=None):
        check_model(model)
        self.session = session = session_type(pipeline, model, tokenizer)
        self.original_attention = session.base
        name = register_attention(session.base)
        self._hooks = []
        try:                    # all or nothing: whatever fails half-way, the model is left as it was
            # plain attributes of the modules (what detach() pops), found by the attention function and load_cache
            for attention in attention_modules(model):
                vars(attention)["_kvpipe_session"] = session
            self._hooks = [
                session.decoder.register_forward_pre_hook(session.before_forward, with_kwargs=True),
                session.decoder.register_forward_hook(session.after_forward, with_kwargs=True),
            ]
            vars(model)["_kvpipe_session"] = session
            model.set_attn_implementation(name)
            if model.config._attn_implementation != name:
                raise UnsupportedModelError(f"{type(model).__name__} refused the attention implementation {name!r}")
        except BaseException:
            self.detach()
            raise
        session.binding.attached = True

    def detach(self) -> None:
        """Remove hooks and attention function; the model computes exactly as before ``attach``."""
        session = self.session
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for attention in attention_modules(session.model):
            attention.__dict__.pop("_kvpipe_session", None)
        session.model.__dict__.pop("_kvpipe_session", None)
        if session.model.config._attn_implementation != self.original_attention:
            session.model.set_attn_implementation(self.original_attention)
        session.binding.attached, session.active, session.last_cache = False, None, None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def cache(self) -> KVPipeCache:
        """A fresh compressed cache for manual loops: ``model(ids, past_key_values=handle.cache())``."""
        return self.session.new_cache()

    def take(self, cache: KVPipeCache) -> KVPipeCache:
        """Drive a cache made elsewhere (``kvpipe.runtime.capture.compressed``, ``cache.fork()``) with this
        attach from now on, as if ``handle.cache()`` had made it; returns it."""
        session = self.session
        if cache.storage.backend != session.backend:
            raise UnsupportedModelError(f"this cache was stored with the {cache.storage.backend} kernels and the "
                                        f"attached pipeline runs {session.backend}; compress it with the same backend")
        if len(cache.layers) != len(session.layout.kinds):
            raise UnsupportedModelError(f"this cache has {len(cache.layers)} layers and the attached model "
                                        f"{len(session.layout.kinds)}; it was made for another model")
        expected = [type(layer) if layer is not None else KVPipeLayer for layer in session.layout.fresh_layers()]
        if [type(layer) for layer in cache.layers] != expected:
            raise UnsupportedModelError("this cache's layers are not the ones the attached pipeline makes for this "
                                        "model (another model, or another layers.sliding policy); compress it "
                                        "with this pipeline")
        cache.rebind(session.binding)
        session.last_cache = cache
        return cache

    def stats(self, cache: KVPipeCache | None = None) -> Stats:
        """Memory held by ``cache`` (default: the last one used) and the time spent compressing it: a ``Stats``
        (``kvpipe.runtime.stats``; every field documented there and in ``docs/stats.md``), readable as a dict too.

        Under tensor parallelism this is a collective: every rank calls it and gets the whole model's numbers
        (bytes summed over ranks, ``kept_tokens`` of every rank's heads in rank order, times the slowest rank's).
        """
        if cache is None:
            if not self.session.attached:
                raise UnsupportedModelError("this handle was detached, and with it the cache it used; call stats() "
                                            "before detach(), or pass the cache: stats(cache=...)")
            cache = self.session.last_cache
            if cache is None:
                raise ValueError("no cache has been used yet; run a forward or generate() first, or pass cache=")
        layers = [layer for layer in cache.compressed_layers if layer.is_initialized]
        full, full_16bit = uncompressed_bytes(cache.layers)
        by_role = bytes_by_role(cache.layers)
        shards = cache.shards
        # on the cache's device: where the tensor-parallel group's backend (gloo: host, nccl: GPU) reduces
        device = layers[0].keys.device if layers else None
        # the whole model's numbers: summed (bytes, shortfall) or the slowest rank's (times) over ranks
        kv_bytes, held, full, full_16bit, shortfall, peak, sent, reserve, *role_bytes = (
            int(n) for n in shards.sum(torch.tensor(
                [cache_bytes(cache), held_bytes(cache), full, full_16bit, cache.budget_shortfall, cache.peak_bytes,
                 cache.collective_bytes, reserved_bytes(cache), *by_role.values()],
                dtype=torch.float64, device=device)))
        seconds = shards.max(torch.tensor([cache.compress_seconds, cache.probe_seconds,
                                           cache.compressing_forward_seconds], dtype=torch.float64,
                                          device=device)).tolist()
        # on the CPU: layers may sit on several devices (device_map), and stats are read on the host
        kept = torch.stack([layer.kept_slots().cpu() for layer in layers]) if layers else torch.empty(0, 0, 0)
        return Stats(
            kv_bytes=kv_bytes, held_bytes=held, tail_reserve_bytes=reserve, kv_bytes_full=full,
            kv_bytes_full_16bit=full_16bit, compression_ratio=full / kv_bytes if kv_bytes else float("nan"),
            kept_tokens=shards.gather(kept, dim=2), seen_tokens=cache.get_seq_length(),
            compress_seconds=seconds[0], probe_seconds=seconds[1], compressing_forward_seconds=seconds[2],
            probe_vs_forward=seconds[1] / max(seconds[2], 1e-9), kv_bytes_peak=max(peak, kv_bytes),
            budget_met=shortfall == 0, layers_kept_whole=cache.layers_kept_whole, budget_shortfall=shortfall,
            collective_bytes=sent, kv_bytes_by_kind=dict(zip(by_role, role_bytes)))
