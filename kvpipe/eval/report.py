"""The Markdown report and plots of a ``kvpipe bench`` run, built from its ``results.jsonl`` records."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from kvpipe.core.table import render

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


def markdown(records: list[dict], plot_names: list[str] = ()) -> str:
    env = next(r for r in records if r["kind"] == "environment")
    tasks = [r for r in records if r["kind"] == "task"]
    out = [f"# Benchmark: {env['suite']}", "",
           f"Model `{env['model']}`, {env['cases']} cases per task and context, seed {env['seed']}, haystack "
           f"{env['haystack']}; {env['date']} on {env['machine']}.  ",
           "Versions: " + ", ".join(f"{k} {env[k]}" for k in ("kvpipe", "torch", "transformers", "kvpress", "python")),
           "", "Accuracy is cases answered correctly (every expected answer in the greedy output). *Bytes* = KV cache "
           "held right after the context is compressed, as a fraction of the full cache on the same prompt "
           "(metadata included). *Kept* = cases the full cache answers that the contender answers too.", ""]
    for (context, protocol), rows in _groups(tasks, ("context", "protocol")).items():
        out += [f"## {context} tokens, question-{protocol}", "", accuracy_table(rows), ""]
        out += ["Best contender per task (ties listed; the full cache excluded):", "", winners_table(rows), ""]
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
    lines = []
    for label, mine in _groups(rows, ("contender",)).items():
        per_task = _groups(mine, ("task",))
        answered = [r for r in mine if "refused" not in r]
        kept = sum(r["correct"] for r in mine if r["full_correct"])
        lines.append([label, *[f"{sum(r['correct'] for r in per_task[t])}/{len(per_task[t])}" for t in tasks],
                      f"{100 * sum(r['correct'] for r in mine) / len(mine):.0f}%",
                      f"{kept}/{sum(r['full_correct'] for r in mine)}",
                      _mean(r["bytes_fraction"] for r in answered), _mean(r["prefill_s"] for r in answered),
                      _mean(r["decode_tps"] for r in answered)])
    return render(["contender", *tasks, "all", "kept", "bytes", "prefill s", "decode tok/s"], lines,
                  align="l" + "r" * (len(tasks) + 5))


def winners_table(rows: list[dict]) -> str:
    lines = []
    for task, mine in _groups(rows, ("task",)).items():
        scores = {label: sum(r["correct"] for r in rs) for label, rs in _groups(mine, ("contender",)).items()
                  if rs[0]["family"] != "full"}
        best = max(scores.values(), default=0)
        n = len(next(iter(_groups(mine, ("contender",)).values())))
        lines.append([task, f"{best}/{n}", ", ".join(c for c, s in scores.items() if s == best) if best else "none"])
    return render(["task", "best", "contenders"], lines, align="lrl")


def fidelity_table(rows: list[dict]) -> str:
    lines = [[r["contender"], r["kl"], r["ppl_full"], r["ppl"], 100 * (r["ppl"] / r["ppl_full"] - 1)]
             if "kl" in r else [r["contender"], "refused", "", "", ""] for r in rows]
    return render(["contender", "KL nats/token", "ppl full", "ppl", "ppl increase %"], lines, align="lrrrr")


def plot_accuracy_vs_bytes(records: list[dict], path: Path) -> Path:
    """One curve per method (its budgets), accuracy over all tasks and contexts against bytes held."""
    plt = _pyplot()
    tasks = [r for r in records if r["kind"] == "task"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, mine in _groups(tasks, ("name",)).items():
        points = sorted((_mean(r["bytes_fraction"] for r in rs if "refused" not in r),
                         100 * sum(r["correct"] for r in rs) / len(rs)) for rs in _groups(mine, ("budget",)).values())
        points = [p for p in points if not math.isnan(p[0])]
        style = {"marker": "*", "markersize": 12} if mine[0]["family"] == "full" else {"marker": "o"}
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    ax.set_xscale("log")
    plain = plt.FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("KV bytes held / full cache (log scale)")
    ax.set_ylabel("accuracy over all tasks, %")
    ax.set_title("accuracy vs bytes held")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_context(records: list[dict], path: Path) -> Path:
    plt = _pyplot()
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


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kvpipe[plot]', or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
