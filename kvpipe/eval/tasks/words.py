"""Common-words extraction (RULER's CWE): a numbered word list in which a few words recur far more often than
the rest; the question asks for the most common ones. Aggregation over the whole context, not retrieval:
every occurrence of a common word is evidence."""
from __future__ import annotations

import random
import re
from functools import lru_cache

from kvpipe.eval.tasks.case import TaskCase, encode, prompt_overhead, token_count
from kvpipe.eval.tasks.haystack import paragraphs

COMMON = 3          # words asked for
SHARE = 0.3         # of all list entries, taken by the common words together
RARE_REPEATS = 2    # each other word appears this many times


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lowercase English words of 5 to 9 letters from the documentation prose."""
    words = {w for p in paragraphs() for w in re.findall(r"\b[a-z]{5,9}\b", p)}
    return tuple(sorted(words))


def common_words_case(tokenizer, rng: random.Random, tokens: int, source: str, kind: str, needles: int) -> TaskCase:
    """``source`` and ``needles`` are unused: the list is the whole context."""
    words = rng.sample(vocabulary(), len(vocabulary()))
    common, rare = words[:COMMON], iter(words[COMMON:])
    question = f"What are the {COMMON} most common words in the list above? Answer with the {COMMON} words."
    budget = tokens - prompt_overhead(tokenizer) - 2
    entries: list[str] = []
    while True:  # grow the list in steps until it fills the budget; the last step is trimmed off
        step = max(8, (budget - token_count(tokenizer, _numbered(entries))) // 6)
        grown = entries + _draw(rng, common, rare, step)
        if token_count(tokenizer, _numbered(grown)) > budget:
            break
        entries = grown
    while step > 1 and token_count(tokenizer, _numbered(entries)) < budget * 0.995:  # fill the last tokens finely
        step //= 2
        grown = entries + _draw(rng, common, rare, step)
        if token_count(tokenizer, _numbered(grown)) <= budget:
            entries = grown
    context = _numbered(entries)
    spans = [m.span(1) for m in re.finditer(rf"\d+\. ({'|'.join(common)})\b", context)]
    return encode(tokenizer, context, question, common[0], tuple(common), 0.0, spans, kind, 16 + 8 * COMMON)


def _draw(rng: random.Random, common: list[str], rare, count: int) -> list[str]:
    """``count`` shuffled entries: about ``SHARE`` common words, the rest fresh rare words repeated."""
    n_common = max(len(common), round(count * SHARE))
    out = [common[i % len(common)] for i in range(n_common)]
    while len(out) < count:
        out += [next(rare)] * RARE_REPEATS
    rng.shuffle(out)
    return out[:count]


def _numbered(entries: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
