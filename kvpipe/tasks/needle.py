"""Needle in a haystack: one fact with a random key and number hidden in real Python documentation.

The question comes *after* the context, so a pipeline can compress the context without seeing it
(question-agnostic, kvpress's protocol) or with it (question-aware: the whole prompt is compressed).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import lru_cache

import torch

ADJECTIVES = ["amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gilded", "hollow", "ivory", "jolly",
              "lunar", "mellow", "nimble", "olive", "placid", "quiet", "rustic", "silver", "tawny", "velvet"]
NOUNS = ["falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "quarry", "river", "saddle", "thicket",
         "violin", "walrus", "anchor", "beacon", "canyon", "dragon", "ember", "glacier", "island", "juniper"]


KINDS = ("single", "multikey", "multivalue", "vartrack")


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
    others are distractors), ``multivalue`` (``needles`` numbers for one key, all asked), ``vartrack``
    (multi-hop: a chain of ``needles`` assignments ending in the asked variable, and a distractor chain).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; one of {KINDS}")
    rng = random.Random(seed)
    prose = paragraphs()
    out = []
    for _ in range(cases):
        facts, evidence, answers, question, key = (_variable_chains(rng, needles) if kind == "vartrack"
                                                   else _magic_numbers(rng, kind, needles))
        depths = sorted(rng.uniform(0.1, 0.9) for _ in facts)
        context = _haystack(tokenizer, prose, rng, context_tokens)
        for fact, depth in reversed(list(zip(facts, depths))):  # from the back, so earlier cuts stay valid
            cut = context.find(". ", int(len(context) * depth))
            cut = len(context) if cut < 0 else cut + 2
            context = context[:cut] + fact + " " + context[cut:]
        spans = [(context.find(fact), context.find(fact) + len(fact)) for fact in evidence]
        out.append(_encode(tokenizer, context, question, key, answers, depths[0], spans))
    return out


def _magic_numbers(rng: random.Random, kind: str, needles: int):
    """``(facts in context order, facts that answer, answers, question, asked key)``: magic-number kinds."""
    count = 1 if kind == "single" else needles
    if kind == "single":
        keys, numbers = [f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"], [str(rng.randrange(1_000_000, 10_000_000))]
    else:
        keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], 1 if kind == "multivalue" else count)
        numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), count)]
    facts = [f"The special magic number for {keys[i % len(keys)]} is {numbers[i]}." for i in range(count)]
    if kind == "multivalue":
        return facts, facts, tuple(numbers), f"What are all the special magic numbers for {keys[0]}? List them.", keys[0]
    return (facts, facts[:1], (numbers[0],),
            f"What is the special magic number for {keys[0]}? Answer with the number only.", keys[0])


def _variable_chains(rng: random.Random, hops: int):
    """RULER-style variable tracking, two hops or more: ``VAR A = 123. ... VAR B = VAR A. ...``, the question asks
    the last variable of the first chain; a second chain with another number is the distractor. All ``hops``
    assignments of the asked chain are evidence (a multi-hop answer needs every one of them)."""
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(2 * hops)]
    while len(set(names)) < len(names):
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(2 * hops)]
    numbers = [str(n) for n in rng.sample(range(10_000, 100_000), 2)]
    chains = []
    for c in range(2):
        chain = names[c * hops:(c + 1) * hops]
        chains.append([f"VAR {chain[0]} = {numbers[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])])
    # interleave the chains (each keeps its own order: a variable is assigned before it is read)
    order = sorted([0] * hops + [1] * hops, key=lambda _: rng.random())
    facts = [chains[c].pop(0) for c in order]
    asked_chain = [f for f in facts if any(f.startswith(f"VAR {n} ") for n in names[:hops])]
    asked = f"VAR {names[hops - 1]}"
    return (facts, asked_chain, (numbers[0],),
            f"What is the value of {asked}? Follow the assignments and answer with the number only.", asked)


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
