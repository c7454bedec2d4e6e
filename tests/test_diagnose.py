"""The fixed-contract diagnostic on a tiny random model (with the real tokenizer, so tasks are real text)."""
from __future__ import annotations

import json

import kvpipe
from kvpipe.eval.diagnose import MODES, Reference, diagnose, diagnose_cases, full_reference, probe_specs, save, summary
from kvpipe.eval.protocol import Protocol

from conftest import tiny_model


def test_probes_change_exactly_one_slot():
    pipeline = kvpipe.build("value-aware")
    probes = probe_specs(pipeline)
    assert set(probes) == {"recovery", "value ranking", "coupled projection"}
    base = pipeline.spec.model_dump(mode="python", exclude_none=True)["stages"]
    for name, spec in probes.items():
        kvpipe.build(spec)                                                    # every probe is a valid pipeline
        changed = [s for s in spec["stages"] if s not in base]
        assert len(changed) == 1 or name == "recovery", name                  # recovery also re-points `after:`
    assert [s["stage"] for s in probes["coupled projection"]["stages"]][-1] == "coupled_projection"


def test_diagnose_classifies_every_failure_and_writes_its_files(smollm, tmp_path):
    _, tokenizer = smollm
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
    pipeline = kvpipe.build("default").with_budget(keep=0.3)
    work = diagnose_cases(tokenizer, ["single", "vartrack"], context=230, cases=1)
    protocol = Protocol(model, tokenizer, question_aware=True)
    measured = full_reference(protocol, work)
    assert len(measured) == 2 and all(r.loglik < 0 for r in measured)
    # A random model answers nothing, so the full cache is *declared* right here: every case the pipeline
    # gets wrong must then be a failure with exactly one mode.
    records = diagnose(protocol, pipeline, work, [Reference(True, r.loglik) for r in measured])
    assert len(records) == 2
    failures = [r for r in records if not r.correct]
    assert failures and sum(r.mode in MODES for r in records) == len(failures)
    for record in records:
        assert 0 <= record.evidence_kept <= 1 and 0 <= record.evidence_split <= 1
        assert set(record.probes) == {"recovery", "value ranking", "coupled projection"}
    bare = diagnose(protocol, pipeline, work[:1], measured[:1], probes=())
    assert bare[0].probes == {} and bare[0].loglik == records[0].loglik      # same contract, no probe reruns
    text = summary(records, "default")
    assert "failure mode" in text and "probe" in text
    written = save(records, tmp_path, "default")
    lines = written[0].read_text().splitlines()
    assert len(lines) == 2 and "margin" in json.loads(lines[0])
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in written)
