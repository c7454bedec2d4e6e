"""``kvpipe`` command line: validate, graph, stages, reference, run, bench, diagnose, train-gates."""
from __future__ import annotations

import argparse
import sys

from kvpipe.cli.arguments import (
    MAX_CASES,
    MIN_CONTEXT,
    OneLineParser,
    count,
    device,
    model_flags,
    number,
    writable_folder,
)
from kvpipe.errors import KVPipeError
from kvpipe.eval.choices import PROBES
from kvpipe.eval.choices import TASK_KINDS as KINDS

EPILOG = """\
examples:
  kvpipe demo                                 two minutes: what compressing a context before the question does
  kvpipe validate pipelines/default.yaml      check a pipeline; prints FILE:LINE:COL on any mistake
  kvpipe graph pipelines/default.yaml --png g.png
  kvpipe stages                               every stage with its parameters and defaults
  kvpipe run pipelines/default.yaml --context 2048 --cases 12
  kvpipe run pipelines/default.yaml --question-aware
  kvpipe bench benchmarks/suites/smoke.yaml   every pipeline and peer of a suite side by side: report + plots
  kvpipe diagnose pipelines/value-aware.yaml pipelines/h2o.yaml --budget 0.25 0.1 --kinds single vartrack
  kvpipe train-gates --steps 300 --context 512 --budget 64 --out gates/

A pipeline is YAML:  version: 1 / budget: {keep: 0.5} / stages: [sinks_window, attention_mass, uniform, topk]
"""


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="kvpipe", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress the KV cache of Hugging Face language models with a declarative pipeline of stages.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="compress documents before the question is seen: full cache, default, int4 and "
                                    "agnostic side by side, then one context asked several questions on forks",
                       description="The story in about two minutes on a CPU: documents with a hidden fact are "
                                   "compressed before the question is seen; the full cache, `default` (attention "
                                   "at prefill), `int4` (every token in 4-bit pages) and `agnostic` (KVzip's "
                                   "reconstruction scores, a quarter of the tokens) answer side by side, with the "
                                   "bytes each holds; then one document is compressed once and asked several "
                                   "questions, each on its own fork of the cache.")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded, default) or a HF model id / path")
    model_flags(p)
    p.add_argument("--context", type=count(MIN_CONTEXT), default=1024, metavar="TOKENS",
                   help="tokens per document (default 1024)")
    p.add_argument("--cases", type=count(1, MAX_CASES), default=4, metavar="N", help="documents (default 4)")
    p.add_argument("--questions", type=count(1, 16), default=3, metavar="N",
                   help="questions asked of the one document compressed once (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated documents (default 0)")
    p = sub.add_parser("validate", help="check a pipeline file; exit 1 with a one-line error if it is wrong")
    p.add_argument("pipeline", help="path of a pipeline YAML file")
    p = sub.add_parser("graph", help="print the stage DAG of a pipeline (or draw it to a PNG)")
    p.add_argument("pipeline", help="path of a pipeline YAML file")
    p.add_argument("--png", metavar="FILE", help="also draw the DAG to this PNG (needs matplotlib)")
    p = sub.add_parser("stages", help="list every registered stage with its parameters and defaults")
    p.add_argument("--markdown", action="store_true", help="print the Markdown catalogue (docs/stages.md)")
    sub.add_parser("reference", help="print the YAML reference of pipeline and suite files (docs/yaml-reference.md)")
    p = sub.add_parser("run", help="needle-in-a-haystack: full cache and the pipeline side by side, one table",
                       description="Hide a fact (random key, 7-digit number) in real Python documentation, ask for "
                                   "it after the context, and compare the full cache with the pipeline: accuracy, "
                                   "KV bytes held, compression ratio, prefill time and decode speed. Under "
                                   "torchrun (torchrun --nproc-per-node N -m kvpipe run ...) the model is loaded with "
                                   "tensor parallelism, each rank holding and compressing its share of the KV heads "
                                   "under the one budget; N must divide the model's KV heads (3 for SmolLM2-135M).")
    p.add_argument("pipeline", help="a shipped pipeline's name (agnostic, int4, ...) or a pipeline YAML file")
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (embedded, default) or a Hugging Face model id / local path")
    model_flags(p)
    p.add_argument("--context", type=count(MIN_CONTEXT), default=2048, metavar="TOKENS",
                   help=f"context length, at least {MIN_CONTEXT} (default 2048)")
    p.add_argument("--cases", type=count(1, MAX_CASES), default=12, metavar="N", help="number of cases (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cases (default 0)")
    p.add_argument("--questions", type=count(1, 64), default=1, metavar="N",
                   help="compress once, ask many: each context holds N facts under different keys and each is "
                        "asked on its own fork of the compressed cache (--cases contexts, N answers each); "
                        "question-agnostic only")
    question_aware_flag(p)
    p = sub.add_parser("bench", help="run a benchmark suite: pipelines and peers side by side, report and plots",
                       description="Run every pipeline (at every budget) and every peer of a suite file on the same "
                                   "generated cases, one process, greedy decoding; the full cache answers each case "
                                   "first as the reference. Pipelines that compress at the end of prefill share one "
                                   "prefill per case, and every answer is also scored by the log-likelihood of the "
                                   "full cache's answer. Writes results.jsonl (one line per answer, as it goes), "
                                   "report.md (accuracy with 95% Wilson intervals, paired McNemar tests against the "
                                   "full cache and between contenders, likelihood margins, bytes held, speed, "
                                   "winners only where significant, fidelity) and plots of accuracy vs bytes "
                                   "(with intervals) and vs context length. Ready suites: "
                                   "benchmarks/suites/{smoke,main,orderings,agnostic}.yaml. Spread over processes: "
                                   "torchrun --nproc-per-node N -m kvpipe bench SUITE deals the cases out to N "
                                   "ranks (each writes results.rank<r>.jsonl; rank 0 merges them into the same "
                                   "records one process gives, then reports).")
    p.add_argument("suite", help="suite YAML file (see docs/benchmarks.md for its keys)")
    p.add_argument("--out", metavar="DIR", help="output folder, new or without a run in it (default "
                                                "bench-results/<suite name>-<date-time>/): a run is never overwritten")
    p.add_argument("--cases", type=count(1, MAX_CASES), metavar="N",
                   help="override the suite's cases per task and context")
    p.add_argument("--contexts", type=count(1), nargs="+", metavar="TOKENS",   # the suite's own minimum applies
                   help="override the suite's context lengths")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="override the suite's tasks")
    p.add_argument("--model", help="override the suite's model")
    p.add_argument("--no-plots", action="store_true", help="write the report without plots (no matplotlib needed)")
    p.add_argument("--devices", type=device, nargs="+", metavar="DEVICE",
                   help="where the model runs (auto, cuda:0, cuda:1, cpu; default: the CPU); under torchrun rank r "
                        "takes the (r mod count)-th")
    model_flags(p, device_flag=False)
    p.add_argument("--no-share", action="store_true",
                   help="let every pipeline run its own prefill instead of compressing one shared prefill per "
                        "case (same results, tested; only to measure what sharing saves)")
    p.add_argument("--always-generate", action="store_true",
                   help="generate every answer, also where the teacher-forced score already proves that greedy "
                        "decoding returns the full cache's answer (same results; only to measure the saving)")
    p = sub.add_parser("diagnose", help="why a pipeline fails: failure modes per case and one-slot-at-a-time probes",
                       description="The fixed-contract diagnostic: per needle case, the answer log-likelihood margin "
                                   "to the full cache, how much of the answer-bearing fact each layer and head kept, "
                                   "the failure mode (evidence missing / irrelevant ranked in / coupled evidence "
                                   "split) and the effect of changing one decision (add recovery, value-aware "
                                   "ranking, coupled projection). Writes a table, a JSONL file and a plot.")
    p.add_argument("pipeline", nargs="+", help="pipeline names or YAML files (each diagnosed on the same cases)")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded) or a HF model id / path")
    model_flags(p)
    p.add_argument("--budget", type=number(0, 1, low_open=True), nargs="+", metavar="KEEP",
                   help="override the budget with keep: KEEP (several: one run per budget)")
    p.add_argument("--kinds", nargs="+", default=["single", "multikey", "multivalue"], choices=KINDS,
                   help="needle task kinds (default: single multikey multivalue; vartrack = multi-hop chains)")
    p.add_argument("--context", type=count(MIN_CONTEXT), default=2048, metavar="TOKENS",
                   help=f"context length, at least {MIN_CONTEXT} (default 2048)")
    p.add_argument("--cases", type=count(1, MAX_CASES), default=6, metavar="N", help="cases per kind (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cases (default 0)")
    question_aware_flag(p)
    p.add_argument("--probes", nargs="*", default=list(PROBES), choices=PROBES, metavar="PROBE",
                   help="one-slot probes to run, each reruns every case (default: all of "
                        f"{', '.join(PROBES)}; `--probes` alone: none, failure modes only, 4x faster)")
    p.add_argument("--out", default="diagnose", metavar="DIR", help="where the JSONL and PNG go (default diagnose/)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG (no matplotlib needed)")
    p = sub.add_parser("train-gates", help="train retention gates for a model (frozen) on local text and tasks",
                       description="Train the retention gates of `retention_gates` (TrimKV / DBTrimKV) with the "
                                   "model frozen: KL to the full model under soft retention plus a global "
                                   "capacity hinge at --budget tokens per head. Data: Python-docs prose and "
                                   "generated needle / multi-key / multi-value / variable-tracking tasks. "
                                   "Checkpoints every --checkpoint-every steps; --resume continues a run.")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded) or a HF model id / path")
    model_flags(p)
    p.add_argument("--out", default="gates", metavar="DIR", help="checkpoint directory (default gates/); the "
                                                                 "gate file is DIR/gates.safetensors")
    p.add_argument("--target", choices=("kl", "reconstruction"), default="kl",
                   help="kl (default): soft retention against the full model, with the capacity hinge; "
                        "reconstruction: distil the gates from KVzip's reconstruction scores (each step one "
                        "prefill and one re-reading of the context, no backward pass through the model; --budget "
                        "unused); use the result with `global` and `calibration: none`")
    p.add_argument("--context", type=count(16), default=None,
                   help="tokens per sequence (default 512 for kl, 1024 for reconstruction)")
    for name, default, kind, helptext in (("steps", 300, count(1, 10 ** 7), "optimiser steps"),
                                          ("budget", 64, count(1), "capacity: tokens per KV head on average"),
                                          ("hidden", 64, count(1, 8192), "gate MLP width"),
                                          ("seed", 0, int, "seed of data and init"),
                                          ("checkpoint-every", 50, count(1, 10 ** 7), "steps between checkpoints")):
        p.add_argument(f"--{name}", type=kind, default=default, help=f"{helptext} (default {default})")
    p.add_argument("--lr", type=number(0, 10, low_open=True), default=1e-2, help="AdamW learning rate (default 1e-2)")
    p.add_argument("--bias-init", type=number(-100, 100), default=None,
                   help="initial readout bias: β = sigmoid(bias) for every token at the start (default for kl 5: "
                        "β ≈ 0.993, a ~150-token memory, the papers' 10 needs far more steps than a CPU run; for "
                        "reconstruction -4: log β ≈ -4, near a typical log score)")
    p.add_argument("--unshared", action="store_true", help="one readout per layer instead of one shared readout "
                                                           "(the ablation of DBTrimKV's tied projection)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KVPipeError as err:                 # SpecError too: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1


def _demo(args) -> int:
    from kvpipe.eval.demo import run_demo
    from kvpipe.eval.protocol import Protocol
    from kvpipe.models import check_context, load

    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    check_context(model, args.context + QUESTION_ROOM, "--context (plus the question and answer)")
    run_demo(Protocol(model, tokenizer), args.context, args.cases, args.questions, args.seed)
    return 0


def _validate(args) -> int:
    # the plan alone: no transformers and no runtime imported, so checking a file takes about a second
    from kvpipe.core.plan import Plan, validated

    plan = validated(Plan, args.pipeline)
    print(f"ok: {plan}")
    return 0


def _graph(args) -> int:
    from kvpipe.core.plan import Plan, validated

    pipeline = validated(Plan, args.pipeline)
    print(pipeline.describe())
    if args.png:
        from kvpipe.cli.draw import draw_graph

        draw_graph(pipeline, args.png)
        print(f"wrote {args.png}")
    return 0


def _stages(args) -> int:
    from kvpipe.cli.catalogue import catalogue

    print(catalogue(markdown=args.markdown), end="")
    return 0


def _reference(args) -> int:
    from kvpipe.cli.reference import yaml_reference

    print(yaml_reference(), end="")
    return 0


def question_aware_flag(parser: argparse.ArgumentParser) -> None:
    """The one flag that picks the protocol (``kvpipe.eval.protocol``), the same in every command."""
    parser.add_argument("--question-aware", action="store_true",
                        help="compress the prompt with the question in it (easier). Default: the context is "
                             "compressed before the question is seen, as in kvpress's protocol")


QUESTION_ROOM = 64     # positions a task needs past its context: the question and the answer


def _run(args) -> int:
    from kvpipe.eval.protocol import Protocol
    from kvpipe.eval.run import per_question, report, run_needle, run_questions
    from kvpipe.models import check_context, launched_by_torchrun, load
    from kvpipe.runtime.pipeline import build

    if args.questions > 1 and args.question_aware:
        raise KVPipeError("--questions N asks several questions about one compressed context: the context is "
                          "compressed before any question, so it cannot be combined with --question-aware")
    pipeline = build(args.pipeline)  # fail on a bad spec before loading anything
    rank, ranks = launched_by_torchrun()                     # under torchrun: one model, its heads split
    model, tokenizer = load(args.model, tensor_parallel=ranks > 1, device=args.device, dtype=args.dtype)
    check_context(model, args.context + QUESTION_ROOM, "--context (plus the question and answer)")
    protocol = Protocol(model, tokenizer, args.question_aware)
    if args.questions == 1:
        full, piped = run_needle(protocol, pipeline, args.context, args.cases, args.seed)
    else:
        full, piped = run_questions(protocol, pipeline, args.context, args.cases, args.questions, args.seed)
    if ranks > 1:
        import torch.distributed as dist

        dist.destroy_process_group()    # before exit: gloo torn down by the interpreter's exit can abort
    if rank:
        return 0                                             # every rank ran the same cases; rank 0 reports
    if ranks > 1:
        print(f"tensor parallel over {ranks} ranks: each compressed its share of the KV heads under one budget")
    print(report(full, piped, protocol, args.context, pipeline.spec.budget))
    if args.questions > 1:
        print(per_question(full, piped, args.questions))
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from kvpipe.eval.bench import check_fidelity, contenders, run_suite
    from kvpipe.eval.report import write_report
    from kvpipe.eval.shard import agreed, close, launched
    from kvpipe.eval.suite import load_suite, with_overrides
    from kvpipe.models import check_context, load

    suite, _ = load_suite(args.suite)
    overrides = {k: v for k in ("cases", "contexts", "tasks", "model") if (v := getattr(args, k)) is not None}
    suite = with_overrides(suite, overrides)
    suite_dir = Path(args.suite).parent
    contenders(suite, suite_dir)                   # a bad pipeline or budget fails before the model loads
    shard = launched()                             # under torchrun: this rank's share of the cases
    # so does an output folder that would overwrite a run; every rank writes into rank 0's
    out = Path(agreed(str(output_folder(args.out, suite.name)) if shard.rank == 0 else "", shard))
    devices = args.devices or ["cpu"]
    model, tokenizer = load(suite.model, device=devices[shard.rank % len(devices)], dtype=args.dtype)
    for context in suite.contexts:               # before any task runs
        check_context(model, context + QUESTION_ROOM, f"suite context {context} (plus the question and answer)")
    check_fidelity(suite, tokenizer)
    records = run_suite(suite, suite_dir, model, tokenizer, out, share=not args.no_share,
                        always_generate=args.always_generate, shard=shard)
    close(shard)
    if shard.rank:
        return 0                                   # rank 0 merges every rank's records and reports
    for path in write_report(records, out, plots=not args.no_plots):
        print(f"wrote {path}")
    print((out / "report.md").read_text())
    return 0


def output_folder(given: str | None, suite_name: str):
    """``--out`` as given, or ``bench-results/<suite>-<date-time>``: never a folder that already holds a run's
    results (they would be overwritten) and never a file."""
    import time
    from pathlib import Path

    out = Path(given) if given else Path("bench-results") / f"{suite_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise KVPipeError(f"--out {out} is a file; give a folder")
    if (out / "results.jsonl").exists():
        raise KVPipeError(f"{out} already holds a run (results.jsonl); give another --out, or remove it first")
    return writable_folder(out, "--out")              # made now: a run whose results cannot be written never starts


def _diagnose(args) -> int:
    from pathlib import Path

    from kvpipe.eval.diagnose import diagnose, diagnose_cases, full_reference, save, summary
    from kvpipe.eval.protocol import Protocol
    from kvpipe.models import check_context, load
    from kvpipe.runtime.pipeline import build

    runs = []                                       # built before the model loads: a bad file fails fast
    for source in args.pipeline:
        pipeline = build(source)
        for keep in args.budget or [None]:
            name = Path(source).stem + (f"-keep{keep}" if keep is not None else "")
            runs.append((name, pipeline.with_budget(keep=keep) if keep is not None else pipeline))
    out = writable_folder(Path(args.out), "--out")               # before the model loads, not after the run
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    check_context(model, args.context + QUESTION_ROOM, "--context (plus the question and answer)")
    protocol = Protocol(model, tokenizer, args.question_aware)
    work = diagnose_cases(tokenizer, args.kinds, args.context, args.cases, args.seed)
    reference = full_reference(protocol, work)
    for name, pipeline in runs:
        records = diagnose(protocol, pipeline, work, reference, tuple(args.probes))
        print(summary(records, name))
        for path in save(records, out, name, plots=not args.no_plots):
            print(f"wrote {path}")
    return 0


BIAS_INIT = {"kl": 5.0, "reconstruction": -4.0}


def _train_gates(args) -> int:
    from pathlib import Path

    from kvpipe.learned.train import TrainConfig, checkpoint_state, train
    from kvpipe.models import check_context, load

    context = args.context or (1024 if args.target == "reconstruction" else 512)
    config = TrainConfig(steps=args.steps, context=context, budget=args.budget, lr=args.lr, hidden=args.hidden,
                         bias_init=args.bias_init if args.bias_init is not None else BIAS_INIT[args.target],
                         shared=not args.unshared, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, target=args.target)
    out = Path(args.out)
    if args.resume:
        checkpoint_state(out, config)             # a checkpoint of other gates, or none, fails before the model loads
    writable_folder(out, "--out")
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    check_context(model, context, "--context")
    _, history = train(model, tokenizer, config, out, resume=args.resume)
    last = history[-10:]
    means = ", ".join(f"{key} {sum(h[key] for h in last) / len(last):.4f}" for key in last[0] if key != "step")
    print(f"trained {len(history)} steps; last 10: {means}; wrote {Path(args.out) / 'gates.safetensors'}")
    return 0


COMMANDS = {"demo": _demo, "validate": _validate, "graph": _graph, "stages": _stages, "reference": _reference,
            "run": _run, "bench": _bench, "diagnose": _diagnose, "train-gates": _train_gates}

if __name__ == "__main__":
    sys.exit(main())
