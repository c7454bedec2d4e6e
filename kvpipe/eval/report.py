"""The Markdown report and plots of a ``kvpipe bench`` run, built from its ``results.jsonl`` records."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from kvpipe.core.plotting import pyplot
from kvpipe.core.table import render
from kvpipe.eval.stats import paired, wilson

PLOTS = ("accuracy_vs_bytes.png", "accuracy_vs_context.png")


def write_report(records: list[dict], out_dir: Path, plots: bool = True) -> list[Path]:
    """``report.md`` (and the plots, unless ``plots=False``) in ``out_dir``; returns the paths written."""
    written = []
    if plots:
        written += [plot_accuracy_vs_bytes(records, out_dir / PLOTS[0]),
                    plot_accuracy_vs_context(records, out_dir / PLOTS[1])]
    path = out_dir / "report.md"
    path.write_text(markdown(records, [p.name for p in written]))
    return [path, *written]


def _wall_time(records: list[dict]) -> str:
    finished = [r["seconds"] for r in records if r["kind"] == "finished"]
    return f"; ran in {finished[0] / 60:.1f} min" if finished else ""


def _cases(env: dict) -> str:
    asked = env.get("questions_per_context", 1)
    if asked == 1:
        return f"{env['cases']} cases"
    return (f"{env['cases']} contexts × {asked} questions (each context compressed once, each question asked on its "
            f"own fork: {env['cases'] * asked} cases)")


def markdown(records: list[dict], plot_names: Sequence[str] = ()) -> str:
    env = next(r for r in records if r["kind"] == "environment")
    tasks = [r for r in records if r["kind"] == "task"]
    out = [f"# Benchmark: {env['suite']}", "",
           f"Model `{env['model']}`, {_cases(env)} per task and context, seed {env['seed']}, haystack "
           f"{env['haystack']}; {env['date']} on {env['machine']}.  ",
           "Versions: " + ", ".join(f"{k} {env[k]}" for k in ("kvpipe", "torch", "transformers", "kvpress", "python"))
           + _wall_time(records),
           "",
           "*Accuracy*: cases answered correctly (every expected answer in the greedy output), with its 95 % Wilson "
           "interval. *Lost/won*: cases the full cache answers and the contender does not / the other way round; "
           "`*` = the difference is significant at 5 % (exact McNemar test on these paired cases). *Margin*: mean "
           "log-likelihood (nats) the full cache's own answer loses under the contender, teacher-forced after the "
           "question; *same answer*: share of cases whose teacher-forced greedy tokens are the full cache's answer. "
           "*Bytes*: KV cache held right after the context is compressed, as a fraction of the full cache "
           "(metadata included).", ""]
    for (context, protocol), rows in _groups(tasks, ("context", "protocol")).items():
        out += [f"## {context} tokens, question-{protocol}", "", accuracy_table(rows), ""]
        out += ["Best contender per task: named only when it answers significantly more cases than the runner-up "
                "(paired test at 5 %); otherwise a tie between all that are not significantly worse than the best:",
                "", winners_table(rows), "", *paired_differences(rows), ""]
    not_run = [f"- {r['contender']}: not run, {r['reason']}" for r in records if r["kind"] == "skipped"]
    not_run += [f"- {c}: refused, {why}" for c, why in sorted({(r["contender"], r["refused"]) for r in tasks
                                                                 if "refused" in r})]
    if not_run:
        out += ["## Not run or refused", "", *not_run, ""]
    fidelity = [r for r in records if r["kind"] == "fidelity"]
    if fidelity:
        out += [f"## Fidelity on held-out prose ({fidelity[0]['context']}-token context, "
                f"{fidelity[0]['continuation']} tokens teacher-forced)", "", fidelity_table(fidelity), ""]
    out += [f"![{name}]({name})" for name in plot_names]
    return "\n".join(out).rstrip() + "\n"


def accuracy_table(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    outcomes = _outcomes(rows)
    full = next((o for label, o in outcomes.items() if _family(rows, label) == "full"), None)
    lines = []
    for label, mine in _groups(rows, ("contender",)).items():
        per_task = _groups(mine, ("task",))
        answered = [r for r in mine if "refused" not in r]
        right = sum(r["correct"] for r in mine)
        low, high = wilson(right, len(mine))
        versus = "-"
        if full is not None and _family(rows, label) != "full":
            test = paired(full, outcomes[label])
            versus = f"{test.only_a}/{test.only_b}" + (" *" if test.significant else "")
        lines.append([label, *[f"{sum(r['correct'] for r in per_task[t])}/{len(per_task[t])}" for t in tasks],
                      f"{100 * right / len(mine):.0f}% [{100 * low:.0f}–{100 * high:.0f}]", versus,
                      _mean(r.get("margin") for r in answered),
                      f"{100 * _mean(r.get('greedy_kept') for r in answered):.0f}%",
                      _mean(r["bytes_fraction"] for r in answered), _mean(r["prefill_s"] for r in answered),
                      _mean(r["decode_tps"] for r in answered)])
    return render(["contender", *tasks, "accuracy [95% CI]", "lost/won", "margin", "same answer", "bytes",
                   "prefill s", "decode tok/s"], lines, align="l" + "r" * (len(tasks) + 7))


def winners_table(rows: list[dict]) -> str:
    lines = []
    for task, mine in _groups(rows, ("task",)).items():
        outcomes = {label: o for label, o in _outcomes(mine).items() if _family(mine, label) != "full"}
        ranked = sorted(outcomes, key=lambda label: -sum(outcomes[label]))
        if not ranked:
            continue
        best, n = ranked[0], len(outcomes[ranked[0]])
        if len(ranked) == 1:
            lines.append([task, f"{sum(outcomes[best])}/{n}", best, "only contender"])
            continue
        runner_up = paired(outcomes[best], outcomes[ranked[1]])
        if runner_up.significant:
            lines.append([task, f"{sum(outcomes[best])}/{n}", best, f"beats {ranked[1]}: {runner_up.describe()}"])
            continue
        tied = [label for label in ranked if not paired(outcomes[best], outcomes[label]).significant]
        lines.append([task, f"{sum(outcomes[best])}/{n}", "tie: " + ", ".join(tied),
                      f"best vs runner-up: {runner_up.describe()}"])
    return render(["task", "best", "winner", "evidence"], lines, align="lrll")


def paired_differences(rows: list[dict]) -> list[str]:
    """Contenders at the same budget compared pairwise over all tasks: the significant differences, listed."""
    out = []
    for budget, mine in _groups(rows, ("budget",)).items():
        outcomes = _outcomes(mine)
        labels = list(outcomes)
        if budget in ("-", "own") or len(labels) < 2:
            continue
        tests = [(a, b, paired(outcomes[a], outcomes[b])) for i, a in enumerate(labels) for b in labels[i + 1:]]
        significant = [(a, b, t) if t.only_a >= t.only_b else (b, a, paired(outcomes[b], outcomes[a]))
                       for a, b, t in tests if t.significant]
        out.append(f"At {budget}, {len(significant)} of {len(tests)} pairs differ significantly (all tasks pooled, "
                   "exact McNemar at 5 %, no correction for the number of pairs); the others are ties" +
                   (":" if significant else "."))
        out += [f"- {a} > {b}: {t.describe()}" for a, b, t in sorted(significant, key=lambda x: x[2].p)]
        out.append("")
    return out


def fidelity_table(rows: list[dict]) -> str:
    lines = [[r["contender"], r["kl"], r["ppl_full"], r["ppl"], 100 * (r["ppl"] / r["ppl_full"] - 1)]
             if "kl" in r else [r["contender"], "refused", "", "", ""] for r in rows]
    return render(["contender", "KL nats/token", "ppl full", "ppl", "ppl increase %"], lines, align="lrrrr")


def plot_accuracy_vs_bytes(records: list[dict], path: Path) -> Path:
    """One curve per method (its budgets), accuracy over all tasks and contexts against bytes held, with 95 %
    Wilson intervals as error bars."""
    plt = pyplot()
    tasks = [r for r in records if r["kind"] == "task"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, mine in _groups(tasks, ("name",)).items():
        points = []
        for rs in _groups(mine, ("budget",)).values():
            right = sum(r["correct"] for r in rs)
            low, high = wilson(right, len(rs))
            points.append((_mean(r["bytes_fraction"] for r in rs if "refused" not in r), 100 * right / len(rs),
                           100 * low, 100 * high))
        points = sorted(p for p in points if not math.isnan(p[0]))
        style = {"marker": "*", "markersize": 12} if mine[0]["family"] == "full" else {"marker": "o"}
        ax.errorbar([p[0] for p in points], [p[1] for p in points], label=name, capsize=3,
                    yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]], **style)
    ax.set_xscale("log")
    plain = plt.FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("KV bytes held / full cache (log scale)")
    ax.set_ylabel("accuracy over all tasks, % (95% Wilson interval)")
    ax.set_title("accuracy vs bytes held")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_context(records: list[dict], path: Path) -> Path:
    plt = pyplot()
    tasks = [r for r in records if r["kind"] == "task"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, mine in _groups(tasks, ("contender",)).items():
        per_context = sorted(_groups(mine, ("context",)).items())
        ax.plot([c for c, _ in per_context], [100 * sum(r["correct"] for r in rs) / len(rs) for _, rs in per_context],
                marker="o", label=label, linewidth=2.5 if mine[0]["family"] == "full" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("accuracy over all tasks, %")
    ax.set_title("accuracy vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """Rows grouped by the values of ``keys`` (a 1-tuple key is unwrapped), in first-seen order."""
    out: dict = defaultdict(list)
    for r in rows:
        out[r[keys[0]] if len(keys) == 1 else tuple(r[k] for k in keys)].append(r)
    return dict(out)


def _outcomes(rows: list[dict]) -> dict[str, list[bool]]:
    """Correctness per contender, in one case order shared by all (so that tests can pair them)."""
    # records of runs before the multi-question protocol have no "question": one question a case
    by_case = {label: {(r["task"], r["case"], r.get("question", 0)): r["correct"] for r in rs}
               for label, rs in _groups(rows, ("contender",)).items()}
    cases = sorted({case for outcomes in by_case.values() for case in outcomes})
    return {label: [outcomes.get(case, False) for case in cases] for label, outcomes in by_case.items()}


def _family(rows: list[dict], label: str) -> str:
    return next(r["family"] for r in rows if r["contender"] == label)


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
