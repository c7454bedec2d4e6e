"""Compress once, ask many: contexts with several facts, each asked on its own fork of one compressed cache."""
from __future__ import annotations

import pytest
import torch

import kvpipe
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.run import per_question, run_questions
from kvpipe.eval.tasks import make_question_sets


@pytest.mark.real_model
def test_question_sets_share_the_context_and_ask_one_fact_each(smollm):
    _, tokenizer = smollm
    sets = make_question_sets(tokenizer, 500, 2, 4, seed=3)
    assert len(sets) == 2 and all(len(cases) == 4 for cases in sets)
    for cases in sets:
        assert all(torch.equal(case.prefix_ids, cases[0].prefix_ids) for case in cases)
        assert abs(cases[0].prefix_ids.shape[1] - 500) <= 8
        assert len({case.answers for case in cases}) == 4 and len({case.key for case in cases}) == 4
        for case in cases:
            (number,) = case.answers
            assert case.context.count(number) == 1 and case.key in case.question
            assert number in tokenizer.decode(case.prefix_ids[0, list(case.evidence)])   # evidence = its fact
        assert [case.depth for case in cases] == sorted(case.depth for case in cases)


@pytest.mark.real_model
def test_a_pipeline_that_keeps_everything_answers_every_question_as_the_full_cache(smollm):
    model, tokenizer = smollm
    protocol = Protocol(model, tokenizer)
    full, piped = run_questions(protocol, kvpipe.build("noop"), 300, 1, 3, seed=1)
    assert len(full.correct) == len(piped.correct) == 3 and piped.correct == full.correct
    assert "fact 3 of 3" in per_question(full, piped, 3)


def test_several_questions_with_question_aware_are_refused(capsys):
    from kvpipe.cli import main

    assert main(["run", "pipelines/default.yaml", "--questions", "3", "--question-aware"]) == 1
    assert "cannot be combined with --question-aware" in capsys.readouterr().err
