"""How every contender is asked a case: one model, its tokenizer, and when the question arrives.

* **question-agnostic** (default): the context alone is prefilled (and compressed), then the question is read;
  the compression cannot know what will be asked (kvpress's protocol, and the use that pays: a context
  compressed once and asked many questions);
* **question-aware**: the whole prompt but its last token is prefilled, so the question is compressed with it.

An answer is scored two ways from the same compressed cache: greedy generation (is every expected answer in
the text?) and, when a reference continuation is given (the full cache's own greedy answer), its
log-likelihood teacher-forced after the question in one forward, and whether greedy decoding would reproduce
it token for token.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from kvpipe.eval.tasks import TaskCase
from kvpipe.models import cache_arg
from kvpipe.runtime.cache import KVPipeCache, cache_bytes
from kvpipe.runtime.capture import Capture, compressed
from kvpipe.runtime.parallel import head_shards
from kvpipe.runtime.pipeline import Pipeline

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel


@dataclass(frozen=True)
class Score:
    """A reference continuation teacher-forced after the question."""

    loglik: float       # its log-likelihood, nats (sum over its tokens)
    greedy: bool        # every one of its tokens is the argmax: greedy decoding reproduces it
    decisive: bool      # greedy, and each argmax leads the runner-up by DECISIVE_GAP logits or more

    @classmethod
    def of(cls, logits: torch.Tensor, reference: torch.Tensor) -> Score:
        """From ``logits [k, vocab]`` predicting each token of ``reference [k]``."""
        logits = logits.float()
        top = logits.topk(2, dim=-1)
        greedy = bool((top.indices[:, 0] == reference).all())
        lead = (top.values[:, 0] - top.values[:, 1]).min()
        return cls(float(logits.log_softmax(-1).gather(-1, reference[:, None]).sum()), greedy,
                   greedy and bool(lead >= DECISIVE_GAP))


# Logits of one teacher-forced forward and of step-by-step decoding differ only by floating-point summation
# order (about 1e-5 in fp32, 1e-2 in bf16): an argmax that leads by this much cannot flip between the two.
DECISIVE_GAP = 0.1


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: torch.Tensor        # long [k]: the generated token ids (the reference other caches are scored on)
    kv_bytes: int               # held right after the compressed part was prefilled (and compressed)
    prefill_s: float            # NaN where a peer does not expose it
    decode_tps: float
    compress_s: float = 0.0
    score: Score | None = None
    generated: bool = True      # False: the score proved greedy decoding gives the reference, so it did not run


@dataclass(frozen=True)
class Protocol:
    model: PreTrainedModel
    tokenizer: Any
    question_aware: bool = False
    # skip generation where the likelihood score proves what greedy decoding would return (see ``ask``)
    skip_proven: bool = False

    @property
    def name(self) -> str:
        return "aware" if self.question_aware else "agnostic"

    def describe(self) -> str:
        return ("question-aware: the question is compressed with the context" if self.question_aware
                else "question-agnostic: the context is compressed before the question is seen")

    def compressed_part(self, case: TaskCase) -> torch.Tensor:
        """``long [1, n]``: what is prefilled, and so compressed, before the rest of the prompt is read."""
        return case.ids[:, :-1] if self.question_aware else case.prefix_ids

    def _on_model(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` on the device of the model's input embeddings (cases are made on the host)."""
        return ids.to(next(self.model.get_input_embeddings().parameters()).device)

    def _seconds_since(self, started: float) -> float:
        """Wall time since ``started``, once a GPU has finished what was queued (timings are not launch times)."""
        if self.model.get_input_embeddings().weight.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def prefill(self, case: TaskCase, cache) -> float:
        """Feed the compressed part into ``cache``; returns the seconds it took."""
        with torch.inference_mode():
            started = time.perf_counter()
            self.model(self._on_model(self.compressed_part(case)), **cache_arg(self.model, cache))
            return self._seconds_since(started)

    def score(self, case: TaskCase, cache, reference: torch.Tensor) -> Score:
        """Teacher-force the rest of the prompt and ``reference [k]`` after the prefilled ``cache`` (which is
        extended: pass a fork to keep it)."""
        rest = self._on_model(case.ids[:, self.compressed_part(case).shape[1]:])
        inputs = torch.cat([rest, self._on_model(reference[None, :-1])], -1)
        with torch.inference_mode():
            logits = self.model(inputs, **cache_arg(self.model, cache)).logits[0, rest.shape[1] - 1:]
        return Score.of(logits, reference.to(logits.device))

    def generate(self, case: TaskCase, cache) -> tuple[str, torch.Tensor, float]:
        """Greedy answer resumed from the prefilled ``cache``: ``(text, token ids [k], tokens/s)``."""
        ids = self._on_model(case.ids)
        with torch.inference_mode():
            started = time.perf_counter()
            # An explicit mask: SmolLM2's pad token is its <|im_end|>, which the chat prompt contains, and
            # transformers < 5.3 would otherwise infer a mask that hides those tokens and shifts positions.
            generate = cast("GenerationMixin", self.model).generate      # causal LMs generate; the type says less
            out = generate(ids, attention_mask=torch.ones_like(ids), **cache_arg(self.model, cache),
                           max_new_tokens=case.max_new_tokens, do_sample=False,
                           pad_token_id=self.tokenizer.pad_token_id)
            seconds = self._seconds_since(started)
        new = out[0, ids.shape[1]:].cpu()
        return self.decode(new), new, len(new) / seconds

    def ask(self, case: TaskCase, cache, measure: Callable[[Any], int] = cache_bytes,
            reference: torch.Tensor | None = None, prefill_s: float | None = None,
            after_prefill: Callable[[Any], None] | None = None, scratch=None) -> Answer:
        """Prefill ``cache`` (unless ``prefill_s`` says it already was), measure what it holds (and call
        ``after_prefill(cache)``), score ``reference`` on a fork, then generate.

        ``skip_proven``: when ``reference`` is a whole greedy answer (it ends with end-of-sequence or fills
        ``max_new_tokens``) and the score is decisive, greedy decoding would give exactly ``reference``: it is
        taken as the answer and generation is skipped (decode speed is then not measured: NaN).
        ``scratch``: a second cache prefilled like ``cache`` to score on, for caches that cannot be copied."""
        return self.ask_each([case], cache, measure, [reference], prefill_s, after_prefill, scratch)[0]

    def ask_each(self, cases: list[TaskCase], cache, measure: Callable[[Any], int] = cache_bytes,
                 references: list[torch.Tensor | None] | None = None, prefill_s: float | None = None,
                 after_prefill: Callable[[Any], None] | None = None, scratch=None) -> list[Answer]:
        """Compress once, ask many: ``cases`` share their compressed part (``make_question_sets``), which is
        prefilled into ``cache`` once; each case is then answered as in ``ask`` on its own fork of it (the last
        on ``cache`` itself), so no question sees another. ``scratch`` only with a single case."""
        references = references or [None] * len(cases)
        if prefill_s is None:
            prefill_s = self.prefill(cases[0], cache)
        held = self.model_wide(measure(cache))
        if after_prefill is not None:
            after_prefill(cache)
        last = len(cases) - 1
        return [self._answer(case, cache if i == last else fork(cache), held, reference, prefill_s, scratch)
                for i, (case, reference) in enumerate(zip(cases, references, strict=True))]

    def _answer(self, case: TaskCase, cache, held: int, reference: torch.Tensor | None, prefill_s: float,
                scratch) -> Answer:
        score = (self.score(case, scratch if scratch is not None else fork(cache), reference)
                 if reference is not None else None)
        if self.skip_proven and score is not None and score.decisive and self.whole_answer(case, reference):
            text, tokens, tps, generated = self.decode(reference), reference, float("nan"), False
        else:
            (text, tokens, tps), generated = self.generate(case, cache), True
        compress_s = cache.compress_seconds if isinstance(cache, KVPipeCache) else 0.0   # decode triggers too
        return Answer(text, tokens, held, prefill_s, tps, compress_s, score, generated)

    def model_wide(self, held: int) -> int:
        """``held`` bytes of this process's cache summed over the model's tensor-parallel ranks (each holds its
        share of the KV heads; a collective there), so every contender is measured over the whole model."""
        shards = head_shards(self.model)
        if not shards.split:
            return held
        return int(shards.sum(torch.tensor(held, dtype=torch.float64, device=self.model.device)))

    def whole_answer(self, case: TaskCase, tokens: torch.Tensor) -> bool:
        """Whether greedy decoding stops after ``tokens [k]``: they end with end-of-sequence or fill the room."""
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        return len(tokens) == case.max_new_tokens or (len(tokens) > 0 and int(tokens[-1]) in eos)

    def decode(self, tokens: torch.Tensor) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def reference_answers(self, cases: list[TaskCase], cache, prefill_s: float | None = None) -> list[Answer]:
        """The reference of each case: the greedy answer from ``cache`` (a full one, holding the cases' shared
        compressed part once ``prefill_s`` is given, else prefilled here), each on its own fork, scored on its
        own tokens."""
        if prefill_s is None:
            prefill_s = self.prefill(cases[0], cache)
        held, out = self.model_wide(cache_bytes(cache)), []
        for i, case in enumerate(cases):
            own, before = cache if i == len(cases) - 1 else fork(cache), fork(cache)
            text, tokens, tps = self.generate(case, own)
            out.append(Answer(text, tokens, held, prefill_s, tps, 0.0, self.score(case, before, tokens)))
        return out

    def reference_answer(self, case: TaskCase, cache, prefill_s: float | None = None) -> Answer:
        """``reference_answers`` of one case."""
        return self.reference_answers([case], cache, prefill_s)[0]

    def ask_pipeline(self, pipeline: Pipeline, case: TaskCase, reference: torch.Tensor | None = None,
                     captured: Capture | None = None, after_prefill: Callable[[Any], None] | None = None) -> Answer:
        """``ask_pipeline_each`` with one case (and ``after_prefill(cache)`` called on the compressed cache)."""
        return self.ask_pipeline_each(pipeline, [case], [reference], captured, after_prefill)[0]

    def ask_pipeline_each(self, pipeline: Pipeline, cases: list[TaskCase],
                          references: list[torch.Tensor | None] | None = None, captured: Capture | None = None,
                          after_prefill: Callable[[Any], None] | None = None) -> list[Answer]:
        """Attach ``pipeline``, compress the cases' shared part once, answer each on its own fork, report what
        the compressed cache holds, detach. With ``captured`` (the compressed part recorded once by
        ``kvpipe.runtime.capture``) the prefill is not run again: the pipeline compresses a fork of it, exactly
        as it would have at the end of the prefill."""
        with pipeline.attach(self.model, self.tokenizer) as handle:
            if captured is None:
                cache, prefill_s = handle.cache(), None
            else:       # a probing stage's probe counts as prefill, as it does when the pipeline prefills itself
                cache = handle.take(compressed(pipeline, captured, handle))
                prefill_s = captured.prefill_seconds + cache.probe_seconds
            return self.ask_each(cases, cache, cache_bytes, references, prefill_s, after_prefill)


def fork(cache):
    """A cache to extend without touching ``cache``: a kvpipe fork (shared tensors), a deep copy otherwise."""
    return cache.fork() if isinstance(cache, KVPipeCache) else copy.deepcopy(cache)
