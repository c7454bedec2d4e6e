"""Needles (RULER-style): magic numbers under random keys, or chains of variable assignments, in a haystack.

``single``: one fact. ``multikey``: ``needles`` facts with different keys, one asked (the others are
distractors). ``multivalue``: ``needles`` numbers for one key, all asked. ``multiquery``: ``needles`` keys,
two of them asked. ``vartrack``: a chain of ``needles`` assignments ending in the asked variable, interleaved
with a distractor chain (multi-hop).
"""
from __future__ import annotations

import random
import string

from kvpipe.eval.tasks.case import TaskCase, encode, insert_facts, prompt_overhead, token_count
from kvpipe.eval.tasks.haystack import haystack

ADJECTIVES = ["amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gilded", "hollow", "ivory", "jolly",
              "lunar", "mellow", "nimble", "olive", "placid", "quiet", "rustic", "silver", "tawny", "velvet"]
NOUNS = ["falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "quarry", "river", "saddle", "thicket",
         "violin", "walrus", "anchor", "beacon", "canyon", "dragon", "ember", "glacier", "island", "juniper"]


KEYS = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]


def hide(tokenizer, rng: random.Random, tokens: int, source: str, draw):
    """Facts drawn by ``draw()`` (``-> (facts, answers, rest)``) inserted at random depths into a haystack that
    fills the prompt up to the question to ``tokens`` tokens; drawn again in the rare case the haystack already
    contains an answer. Returns ``(context, depths, (facts, answers, rest))``."""
    while True:
        drawn = draw()
        facts, answers, _ = drawn
        depths = sorted(rng.uniform(0.1, 0.9) for _ in facts)
        fixed = prompt_overhead(tokenizer) + sum(token_count(tokenizer, fact) + 1 for fact in facts) + 2
        context = insert_facts(haystack(tokenizer, rng, tokens - fixed, source), facts, depths)
        if all(context.count(answer) == 1 for answer in answers):
            return context, depths, drawn


def needle_case(tokenizer, rng: random.Random, tokens: int, source: str, kind: str, needles: int) -> TaskCase:
    """One case whose prompt up to the question is ``tokens`` tokens long (to a few tokens)."""
    def draw():
        facts, evidence, answers, question, key = (variable_chains(rng, needles) if kind == "vartrack"
                                                   else magic_numbers(rng, kind, needles))
        return facts, answers, (evidence, question, key)

    context, depths, (facts, answers, (evidence, question, key)) = hide(tokenizer, rng, tokens, source, draw)
    spans = [(context.find(fact), context.find(fact) + len(fact)) for fact in evidence]
    # about 20 tokens per extra 7-digit number: the model lists them as "* 1234567: ..." bullets
    return encode(tokenizer, context, question, key, answers, depths[0], spans, kind, 24 + 20 * (len(answers) - 1))


def magic_numbers(rng: random.Random, kind: str, needles: int):
    """``(facts in context order, facts that answer, answers, question, asked key)``: magic-number kinds."""
    count = 1 if kind == "single" else max(needles, 2)
    keys = rng.sample(KEYS, 1 if kind in ("single", "multivalue") else count)
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), count)]
    facts = [f"The special magic number for {keys[i % len(keys)]} is {numbers[i]}." for i in range(count)]
    if kind == "multivalue":
        question = f"What are all the special magic numbers for {keys[0]}? List them."
        return facts, facts, tuple(numbers), question, keys[0]
    if kind == "multiquery":
        asked = sorted(rng.sample(range(count), 2))
        question = (f"What are the special magic numbers for {keys[asked[0]]} and {keys[asked[1]]}? "
                    "Answer with the two numbers.")
        return facts, [facts[i] for i in asked], tuple(numbers[i] for i in asked), question, keys[asked[0]]
    return facts, facts[:1], (numbers[0],), ask_number(keys[0]), keys[0]


def ask_number(key: str) -> str:
    return f"What is the special magic number for {key}? Answer with the number only."


def question_set(tokenizer, rng: random.Random, tokens: int, source: str, questions: int) -> list[TaskCase]:
    """One context holding ``questions`` facts under different keys, and one case per fact asking for it alone,
    in context order; every case has the same ``prefix_ids`` (a context compressed once, asked many times)."""
    def draw():
        keys = rng.sample(KEYS, questions)
        numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), questions)]
        return [f"The special magic number for {key} is {number}." for key, number in zip(keys, numbers)], numbers, keys

    context, depths, (facts, numbers, keys) = hide(tokenizer, rng, tokens, source, draw)
    return [encode(tokenizer, context, ask_number(key), key, (number,), depth,
                   [(context.find(fact), context.find(fact) + len(fact))], "single")
            for key, number, fact, depth in zip(keys, numbers, facts, depths)]


def variable_chains(rng: random.Random, hops: int):
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
