"""Locally generated evaluation tasks (no downloads), seeded, at a requested prompt length.

Haystacks are real prose from ``pydoc_data.topics`` or, for contrast, RULER's repeated filler.
"""
from __future__ import annotations

import random

from kvpipe.eval.choices import TASK_KINDS
from kvpipe.eval.tasks.case import TaskCase
from kvpipe.eval.tasks.haystack import HAYSTACKS, paragraphs
from kvpipe.eval.tasks.needle import needle_case, question_set
from kvpipe.eval.tasks.prose_qa import prose_qa_case
from kvpipe.eval.tasks.words import common_words_case

TASKS = {"single": needle_case, "multikey": needle_case, "multivalue": needle_case, "multiquery": needle_case,
         "vartrack": needle_case, "common_words": common_words_case, "prose_qa": prose_qa_case}
KINDS = TASK_KINDS
assert tuple(TASKS) == KINDS, "kvpipe.eval.choices.TASK_KINDS names the tasks the command line offers"


def make_cases(tokenizer, context_tokens: int, cases: int, seed: int = 0, kind: str = "single", needles: int = 3,
               haystack: str = "prose") -> list[TaskCase]:
    """``cases`` seeded cases of task ``kind`` whose prompt up to the question (chat header + context) is
    ``context_tokens`` tokens long, to within a few tokens. ``needles``: facts per needle case (distractors
    for ``multikey``, values for ``multivalue``, keys for ``multiquery``, hops for ``vartrack``)."""
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; one of {', '.join(KINDS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; one of {', '.join(HAYSTACKS)}")
    rng = random.Random(f"{seed}-{kind}-{haystack}")
    return [TASKS[kind](tokenizer, rng, context_tokens, haystack, kind, needles) for _ in range(cases)]


def make_question_sets(tokenizer, context_tokens: int, contexts: int, questions: int, seed: int = 0,
                       haystack: str = "prose") -> list[list[TaskCase]]:
    """``contexts`` seeded contexts of ``context_tokens`` tokens, each holding ``questions`` facts under different
    keys, with one single-fact case per key (all sharing the context's ``prefix_ids``)."""
    rng = random.Random(f"{seed}-questions-{questions}-{haystack}")
    return [question_set(tokenizer, rng, context_tokens, haystack, questions) for _ in range(contexts)]


__all__ = ["HAYSTACKS", "KINDS", "TASKS", "TaskCase", "make_cases", "make_question_sets", "paragraphs"]
