"""Haystacks: real prose from the standard library's documentation, or RULER's repeated filler, cut to length."""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Literal, get_args

Haystack = Literal["prose", "filler"]
HAYSTACKS: tuple[str, ...] = get_args(Haystack)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Paragraphs of prose from ``pydoc_data.topics`` (no code blocks, grammar rules or headings)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            if len(text) > 80 and not block.startswith("   ") and "::=" not in text and not text.startswith(("*", "=")):
                out.append(text)
    return tuple(out)


def haystack(tokenizer, rng: random.Random, tokens: int, source: str = "prose") -> str:
    """About ``tokens`` tokens of ``source`` text (prose from a random paragraph on; or filler), cut at a word end."""
    if source not in HAYSTACKS:
        raise ValueError(f"unknown haystack {source!r}; one of {HAYSTACKS}")
    if tokens <= 0:
        return ""
    if source == "filler":
        sentence_tokens = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
        text = " ".join([FILLER] * (tokens // sentence_tokens + 2))
    else:
        prose, i, chosen, count = paragraphs(), rng.randrange(len(paragraphs())), [], 0
        while count < tokens + 8:
            chosen.append(prose[i % len(prose)])
            count += len(tokenizer(chosen[-1], add_special_tokens=False).input_ids) + 1
            i += 1
        text = "\n".join(chosen)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    end = offsets[min(tokens, len(offsets)) - 1][1]
    cut = text.rfind(" ", 0, end + 1)                 # a whole word, so re-tokenising gives the same tokens
    return text[: cut if cut > 0 else end]
