"""What a benchmark compares: the full cache, kvpipe pipelines at a budget, and peers from other libraries.

Every contender answers the same ``TaskCase`` with greedy decoding and reports the bytes its cache holds right
after the context is compressed (before the question is read, in the question-agnostic protocol), so that
bytes mean the same thing for every library.

Peers: transformers' ``QuantizedCache`` (quanto and HQQ backends) and, when the ``kvpress`` package is
installed, kvpress presses run through kvpress's own ``kv-press-text-generation`` pipeline, as its users run
them. kvpress 0.5.5 needs ``transformers<5.3``: ``make test-tf52`` builds such an environment.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import tempfile

import torch
from transformers import DynamicCache, QuantizedCache

from kvpipe.core.spec import Budget
from kvpipe.errors import KVPipeError
from kvpipe.eval.fidelity import continuation_logits
from kvpipe.eval.protocol import Answer, Protocol, Score
from kvpipe.eval.tasks import TaskCase
from kvpipe.runtime.cache import cache_bytes
from kvpipe.runtime.capture import Capture
from kvpipe.runtime.pipeline import Pipeline

QUANTIZED_PEERS = {f"{backend}-int{bits}": (backend, bits) for backend in ("quanto", "hqq") for bits in (2, 4)}
KVPRESS_PEERS = {  # name -> (press class, wrap in AdaKVPress)
    "kvpress-snapkv": ("SnapKVPress", False),
    "kvpress-expected-attention": ("ExpectedAttentionPress", False),
    "kvpress-knorm": ("KnormPress", False),
    "kvpress-streaming": ("StreamingLLMPress", False),
    "kvpress-tova": ("TOVAPress", False),
    "kvpress-adakv-snapkv": ("SnapKVPress", True),
    "kvpress-adakv-expected-attention": ("ExpectedAttentionPress", True),
    "kvpress-kvzip": ("KVzipPress", False),       # context reconstruction (question-agnostic), global ranking
}
PEERS = tuple(QUANTIZED_PEERS) + tuple(KVPRESS_PEERS)
RELOAD_TOKENIZER = {"KVzipPress"}           # presses that load the tokenizer again by the model's name
QUANT_GROUP, QUANT_RESIDUAL = 64, 128   # transformers' QuantizedCache defaults are 64 and 128 too


class Contender:
    """``name`` = the method (one curve in plots), ``budget`` = what it was given, ``label`` = both."""

    family = "?"

    def __init__(self, name: str, budget: str):
        self.name, self.budget = name, budget

    @property
    def label(self) -> str:
        return self.name if self.budget == "-" else f"{self.name} @ {self.budget}"

    def answer(self, protocol: Protocol, cases: list[TaskCase], references: list[torch.Tensor] | None = None,
               captured: Capture | None = None) -> list[Answer]:
        """Answer each of ``cases``, which share their compressed part (one case, or the questions of one
        context): it is compressed once and every question asked apart from the others. With ``references``
        (token ids, one per case), also score them teacher-forced. ``captured``: the compressed part prefilled
        once (``kvpipe.runtime.capture``), for contenders that can start from it."""
        raise NotImplementedError

    def logits(self, model, context: torch.Tensor, continuation: torch.Tensor, tokenizer=None) -> torch.Tensor:
        """``[n, vocab]`` logits predicting ``continuation [1, n]`` after ``context [1, m]`` was compressed
        (``tokenizer``: the model's, for pipelines whose stages encode text)."""
        raise NotImplementedError


class FullCache(Contender):
    family = "full"

    def __init__(self):
        super().__init__("full cache", "-")

    def answer(self, protocol, cases, references=None, captured=None):
        cache = DynamicCache(config=protocol.model.config)
        if captured is None:
            return protocol.reference_answers(cases, cache)
        return protocol.reference_answers(cases, captured.fill(cache), captured.prefill_seconds)

    def logits(self, model, context, continuation, tokenizer=None):
        return continuation_logits(model, context, continuation, DynamicCache(config=model.config))


class PipelineContender(Contender):
    family = "kvpipe"

    def __init__(self, name: str, pipeline: Pipeline, budget: str):
        super().__init__(name, budget)
        self.pipeline = pipeline

    def answer(self, protocol, cases, references=None, captured=None):
        return protocol.ask_pipeline_each(self.pipeline, cases, references, captured)

    def logits(self, model, context, continuation, tokenizer=None):
        with self.pipeline.attach(model, tokenizer) as handle:
            return continuation_logits(model, context, continuation, handle.cache())


class QuantizedPeer(Contender):
    """transformers' ``QuantizedCache``: its own budget (the bit width); keeps the last 128 tokens unquantized."""

    family = "transformers"

    def __init__(self, name: str):
        super().__init__(f"transformers {name}", "own")
        self.backend, self.bits = QUANTIZED_PEERS[name]

    def _cache(self, model):
        return QuantizedCache(self.backend, model.config, nbits=self.bits, q_group_size=QUANT_GROUP,
                              residual_length=QUANT_RESIDUAL)

    def answer(self, protocol, cases, references=None, captured=None):
        # Quantizing depends on no question, so filling a cache per question is the same as forking one: needed,
        # since quanto's packed tensors refuse deepcopy (the likelihood is scored on a second cache, too).
        return [self._answer(protocol, case, reference, captured)
                for case, reference in zip(cases, references or [None] * len(cases), strict=True)]

    def _answer(self, protocol, case, reference, captured):
        def prefilled():
            cache = self._cache(protocol.model)
            if captured is not None:
                return captured.fill(cache), captured.prefill_seconds
            return cache, protocol.prefill(case, cache)

        cache, prefill_s = prefilled()
        scratch = prefilled()[0] if reference is not None else None
        return protocol.ask(case, cache, held_bytes, reference, prefill_s, scratch=scratch)

    def logits(self, model, context, continuation, tokenizer=None):
        return continuation_logits(model, context, continuation, self._cache(model))


class KVPressPeer(Contender):
    """A kvpress press at the compression the budget implies, run through kvpress's own text pipeline: the
    context is compressed once (with kvpress's chat-template split), then the question is answered greedily
    with logical positions. Question-aware = the question appended to the context, as kvpress's
    ``--query_aware`` does."""

    family = "kvpress"

    def __init__(self, name: str, budget: Budget):
        super().__init__(name, str(budget))
        self.press_class, self.adakv = KVPRESS_PEERS[name]
        self.budget_spec = budget

    def press(self, context_tokens: int):
        import kvpress

        keep = {"keep": self.budget_spec.keep, "bytes": self.budget_spec.bytes}.get(self.budget_spec.kind)
        keep = keep if keep is not None else min(1.0, self.budget_spec.tokens / context_tokens)
        # kvpress keeps tokens at the model's precision, so a bytes fraction is a token fraction
        press = getattr(kvpress, self.press_class)(compression_ratio=1 - keep)
        return kvpress.AdaKVPress(press) if self.adakv else press

    def answer(self, protocol, cases, references=None, captured=None):
        from transformers import pipeline

        importlib.import_module("kvpress")          # importing kvpress registers its "kv-press-text-generation" task

        model, aware, case = protocol.model, protocol.question_aware, cases[0]
        if aware and len(cases) > 1:
            raise KVPipeError("question-aware compression sees one question: ask several only question-agnostically")
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=protocol.tokenizer)
        context = case.context + ("\n\n" + case.question if aware else "")
        cache = DynamicCache(config=model.config)
        with self.tokenizer_found(model, protocol.tokenizer):
            out = pipe(context, questions=[c.question for c in cases], answer_prefix=case.answer_prefix,
                       press=self.press(case.prefix_ids.shape[1]), max_new_tokens=case.max_new_tokens, cache=cache)
        # The pipeline cuts the cache back to the compressed context after each answer, by slicing: count the
        # tensors' own sizes, not their (larger) storage. Masking presses (AdaKV) keep every token: ratio 1.
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)
        answers = []
        for c, text, reference in zip(cases, out["answers"], references or [None] * len(cases), strict=True):
            score = self.score(pipe, copy.deepcopy(cache), context, c, reference) if reference is not None else None
            tokens = protocol.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            # prefill and decode are not timed apart inside kvpress's pipeline: no speed numbers, not mixed ones
            answers.append(Answer(text, tokens, held, float("nan"), float("nan"), score=score))
        return answers

    def tokenizer_found(self, model, tokenizer):
        """Where the press loads the tokenizer again by the model's name: the name pointed at a saved copy."""
        needed = self.press_class in RELOAD_TOKENIZER and tokenizer is not None
        return tokenizer_folder(model, tokenizer) if needed else contextlib.nullcontext()

    @staticmethod
    def score(pipe, cache, context: str, case: TaskCase, reference: torch.Tensor) -> Score:
        """``reference`` teacher-forced on the compressed context the pipeline leaves in ``cache``, after the
        question tokens the pipeline itself feeds, at the logical positions it uses."""
        inputs = pipe.preprocess(context, [case.question], case.answer_prefix, max_context_length=10**10)
        start, question = inputs["context_ids"].shape[1], inputs["questions_ids"][0]
        ids = torch.cat([question, reference[None, :-1]], -1)
        with torch.inference_mode():
            logits = pipe.model(ids, past_key_values=cache,
                                position_ids=torch.arange(start, start + ids.shape[1])[None]).logits[0]
        return Score.of(logits[question.shape[1] - 1:], reference)

    def logits(self, model, context, continuation, tokenizer=None):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode(), self.tokenizer_found(model, tokenizer):
            with self.press(context.shape[1])(model):
                last = model(context, past_key_values=cache).logits[0, -1:]
            # the cache is physically shorter now: positions must stay logical, as kvpress's pipeline does
            start = context.shape[1]
            positions = torch.arange(start, start + continuation.shape[1] - 1)[None]
            rest = model(continuation[:, :-1], past_key_values=cache, position_ids=positions).logits[0]
        return torch.cat([last, rest]).float()


@contextlib.contextmanager
def tokenizer_folder(model, tokenizer):
    """kvpress's ``KVzipPress`` reloads the tokenizer from ``model.config.name_or_path``; the embedded model
    comes from a GGUF file that ``AutoTokenizer`` cannot open without its name, so for the call the model's
    name points at a folder holding ``tokenizer`` (the same one, saved)."""
    original = model.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="kvpipe-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        model.config.name_or_path = folder
        try:
            yield
        finally:
            model.config.name_or_path = original


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def peer(name: str, budget: Budget | None) -> Contender:
    """A peer by name (see ``PEERS``); kvpress peers need a budget and the ``kvpress`` package."""
    if name in QUANTIZED_PEERS:
        return QuantizedPeer(name)
    if name not in KVPRESS_PEERS:
        raise KVPipeError(f"unknown peer {name!r}; one of {', '.join(PEERS)}")
    if not kvpress_available():
        raise KVPipeError(f"peer {name!r} needs kvpress, which is not installed (kvpress 0.5.5 needs "
                          "transformers<5.3: `make test-tf52` builds that environment)")
    return KVPressPeer(name, budget)


def held_bytes(cache) -> int:
    """Real storage of any cache: kvpipe's, a DynamicCache, or QuantizedCache (its packed tensors included)."""
    if isinstance(cache, QuantizedCache):                 # its layers keep the packed tensors beside keys/values
        return sum(_tensor_bytes(vars(layer)) for layer in cache.layers)
    return cache_bytes(cache)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__"):            # quanto's packed tensors are tensor subclasses
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, name)) for name in names)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
