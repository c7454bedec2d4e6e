"""Question answering over real prose: the answer is a sentence of the documentation text in the context.

The question quotes the opening words of one sentence and asks for the rest, and the answer starts with those
words (an answer prefix, as kvpress's pipeline has); the case is correct when the model goes on with the words
that follow them in the text. SmolLM2-135M rarely manages this even with the full cache (1 case in 6 at 1k
tokens): a task for larger models, kept so that suites for them need nothing new. The sentence is unique in the
context (as are its opening and the asked words), so the answer must come from that spot; the model may have
read the Python docs in training, so compare with the full cache's score, not with 100 %.
"""
from __future__ import annotations

import random
import re

from kvpipe.eval.tasks.case import TaskCase, encode, prompt_overhead
from kvpipe.eval.tasks.haystack import haystack

QUOTED, ASKED = 6, 4    # words quoted in the question, words after them that must appear in the answer


def prose_qa_case(tokenizer, rng: random.Random, tokens: int, source: str, kind: str, needles: int) -> TaskCase:
    """``source`` must be prose (filler has no distinct sentences); ``needles`` is unused."""
    if source != "prose":
        raise ValueError("prose_qa needs the prose haystack: filler text has no distinct sentences to ask about")
    while True:
        context = haystack(tokenizer, rng, tokens - prompt_overhead(tokenizer) - 2, source)
        sentences = [m for m in re.finditer(r"(?<=[.!?] )[A-Z][^.!?]{40,300}[.!?](?= )", context)  # inner ones
                     if 0.1 * len(context) < m.start() < 0.9 * len(context)
                     and len(m.group().split()) >= QUOTED + ASKED]
        rng.shuffle(sentences)
        for m in sentences:
            words = m.group().split()
            opening, asked = " ".join(words[:QUOTED]), " ".join(words[QUOTED:QUOTED + ASKED])
            if context.count(opening) == 1 and context.count(asked) == 1:
                question = f'Continue this sentence from the text above, word for word: "{opening}"'
                return encode(tokenizer, context, question, opening, (asked,), m.start() / len(context),
                              [m.span()], kind, 32, answer_prefix=opening)
