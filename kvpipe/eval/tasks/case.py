"""One evaluation case and how it is laid out: a chat prompt whose context holds the facts, a question after it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskCase:
    """``prefix_ids`` = chat prompt up to the end of the context, ``suffix_ids`` = the question and the assistant
    turn's opening; ``ids = cat(prefix_ids, suffix_ids)``, both ``long [1, n]``. Correct when every one of
    ``answers`` appears in the generated text (ignoring case, quote style and whitespace). ``context``,
    ``question`` and ``answer_prefix`` keep the plain text (peers such as kvpress take text, not ids)."""

    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    key: str
    answers: tuple[str, ...]
    depth: float
    evidence: tuple[int, ...] = ()      # positions in prefix_ids of the fact(s) that answer the question
    kind: str = "single"
    context: str = ""
    question: str = ""
    max_new_tokens: int = 24            # room for "The special magic number for <key> is <number>."
    answer_prefix: str = ""             # the assistant turn starts with it (in suffix_ids); the model continues

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([self.prefix_ids, self.suffix_ids], dim=-1)

    def is_correct(self, generated: str) -> bool:
        text = normalize(generated)
        return all(normalize(answer) in text for answer in self.answers)


def normalize(text: str) -> str:
    """Case, curly quotes and runs of whitespace do not make an answer wrong."""
    text = text.translate(str.maketrans("‘’“”", "''\"\""))
    return " ".join(text.casefold().split())


MARKER = "\x00QUESTION\x00"


def prompt_overhead(tokenizer) -> int:
    """Tokens the chat template puts before the context (system prompt, role header)."""
    head = _chat(tokenizer, "").split(MARKER)[0]
    return len(tokenizer(head, add_special_tokens=False).input_ids)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def insert_facts(context: str, facts: list[str], depths: list[float]) -> str:
    """Each fact after the first sentence end at or past ``depth`` (a fraction of the text), in order."""
    for fact, depth in reversed(list(zip(facts, depths))):  # from the back, so earlier cuts stay valid
        cut = context.find(". ", int(len(context) * depth))
        cut = len(context) if cut < 0 else cut + 2
        context = context[:cut] + fact + " " + context[cut:]
    return context


def encode(tokenizer, context: str, question: str, key: str, answers: tuple[str, ...], depth: float,
           spans: list[tuple[int, int]], kind: str, max_new_tokens: int = 24, answer_prefix: str = "") -> TaskCase:
    """Chat-template ``context`` + question; ``spans`` (character ranges of the context) become ``evidence``."""
    head, tail = _chat(tokenizer, context + "\n\n").split(MARKER)
    encoded = tokenizer(head, add_special_tokens=False, return_tensors="pt", return_offsets_mapping=True)
    start = head.find(context)
    evidence = tuple(i for i, (lo, hi) in enumerate(encoded.offset_mapping[0].tolist())
                     if any(start + a < hi and lo < start + b for a, b in spans))
    suffix = tokenizer(question + tail + answer_prefix, add_special_tokens=False, return_tensors="pt").input_ids
    return TaskCase(encoded.input_ids, suffix, key, answers, depth, evidence, kind, context, question, max_new_tokens,
                    answer_prefix)


def _chat(tokenizer, context: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": context + MARKER}],
                                         add_generation_prompt=True, tokenize=False)
