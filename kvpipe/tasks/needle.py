"""Needle in a haystack: one fact with a random key and number hidden in real Python documentation.

The question comes *after* the context, so a pipeline can compress the context without seeing it
(question-agnostic, kvpress's protocol) or with it (question-aware: the whole prompt is compressed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

ADJECTIVES = ["amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gilded", "hollow", "ivory", "jolly",
              "lunar", "mellow", "nimble", "olive", "placid", "quiet", "rustic", "silver", "tawny", "velvet"]
NOUNS = ["falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "quarry", "river", "saddle", "thicket",
         "violin", "walrus", "anchor", "beacon", "canyon", "dragon", "ember", "glacier", "island", "juniper"]


KINDS = ("single", "multikey", "multivalue")


@dataclass(frozen=True)
class NeedleCase:
    """One case: ``prefix_ids`` = chat prompt up to the end of the context, ``suffix_ids`` = the question
    and the assistant turn's opening. ``ids = cat(prefix_ids, suffix_ids)``, both ``long [1, n]``.
    Correct when every one of ``answers`` appears in the generated text."""

    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    key: str
    answers: tuple[str, ...]
    depth: float
    evidence: tuple[int, ...] = ()      # positions in prefix_ids of the fact(s) that answer the question

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([self.prefix_ids, self.suffix_ids], dim=-1)

    @property
    def answer(self) -> str:
        return self.answers[0]

    def is_correct(self, generated: str) -> bool:
        return all(answer in generated for answer in self.answers)


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Paragraphs of prose from the standard library's documentation topics (no code blocks)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            # Prose only: code, grammar rules and headings make a poor haystack.
            if len(text) > 80 and not block.startswith("   ") and "::=" not in text and not text.startswith(("*", "=")):
                out.append(text)
    return tuple(out)


def make_needle_cases(tokenizer, context_tokens: int, cases: int, seed: int = 0, kind: str = "single",
                      needles: int = 3) -> list[NeedleCase]:
    """``cases`` seeded cases whose context is ``context_tokens`` tokens long (within a paragraph).

    ``kind``: ``single`` (one fact), ``multikey`` (``needles`` facts with different keys, one asked: the
    others are distractors), ``multivalue`` (``needles`` numbers for one key, all asked).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; one of {KINDS}")
    rng = random.Random(seed)
    prose = paragraphs()
    out = []
    for _ in range(cases):
        count = 1 if kind == "single" else needles
        if kind == "single":
            keys, numbers = [f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"], [str(rng.randrange(1_000_000, 10_000_000))]
        else:
            keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], 1 if kind == "multivalue" else count)
            numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), count)]
        facts = [f"The special magic number for {keys[i % len(keys)]} is {numbers[i]}." for i in range(count)]
        depths = sorted(rng.uniform(0.1, 0.9) for _ in facts)
        context = _haystack(tokenizer, prose, rng, context_tokens)
        for fact, depth in reversed(list(zip(facts, depths))):  # from the back, so earlier cuts stay valid
            cut = context.find(". ", int(len(context) * depth))
            cut = len(context) if cut < 0 else cut + 2
            context = context[:cut] + fact + " " + context[cut:]
        asked = keys[0]
        answers = tuple(numbers) if kind == "multivalue" else (numbers[0],)
        needed = facts if kind == "multivalue" else facts[:1]
        spans = [(context.find(fact), context.find(fact) + len(fact)) for fact in needed]
        question = (f"What are all the special magic numbers for {asked}? List them." if kind == "multivalue"
                    else f"What is the special magic number for {asked}? Answer with the number only.")
        out.append(_encode(tokenizer, context, question, asked, answers, depths[0], spans))
    return out


def _haystack(tokenizer, prose: tuple[str, ...], rng: random.Random, tokens: int) -> str:
    start = rng.randrange(len(prose))
    chosen, count = [], 0
    i = start
    while count < tokens:
        paragraph = prose[i % len(prose)]
        chosen.append(paragraph)
        count += len(tokenizer(paragraph, add_special_tokens=False).input_ids) + 1
        i += 1
    return "\n".join(chosen)


def _encode(tokenizer, context: str, question: str, key: str, answers: tuple[str, ...], depth: float,
            spans: list[tuple[int, int]]) -> NeedleCase:
    marker = "\x00QUESTION\x00"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": context + "\n\n" + marker}],
                                           add_generation_prompt=True, tokenize=False)
    head, tail = prompt.split(marker)
    encoded = tokenizer(head, add_special_tokens=False, return_tensors="pt", return_offsets_mapping=True)
    start = head.find(context)
    evidence = tuple(i for i, (lo, hi) in enumerate(encoded.offset_mapping[0].tolist())
                     if any(start + a < hi and lo < start + b for a, b in spans))
    suffix = tokenizer(question + tail, add_special_tokens=False, return_tensors="pt").input_ids
    return NeedleCase(encoded.input_ids, suffix, key, answers, depth, evidence)
