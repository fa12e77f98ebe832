"""The demo's report: a per-stage table and PNG plots of the training curves.

Reads only what the stages wrote: each eval's summary.json and samples.jsonl, and
the trainers' metrics.jsonl (reason/tracker.py), so the report can be rebuilt from
a finished run without re-running anything.
"""
from __future__ import annotations

import platform
from pathlib import Path

from reason.console import console
from reason.records import read_jsonl


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def table_rows(summaries: dict[str, dict], lengths: dict[str, float | None]) -> list[list[str]]:
    rows = []
    for stage, s in summaries.items():
        o = s["overall"]
        rows.append([stage, _pct(o["pass@1"]), _pct(1 - o["format_violation_rate"]),
                     _num(o["mean_tokens"]), _num(lengths.get(stage)), _pct(o["truncation_rate"])])
    return rows


HEADER = ["stage", "accuracy (pass@1)", "format ok", "mean length (tokens)", "mean length of correct", "truncated"]


def _plot(path: Path, series: dict[str, list[tuple[int, float]]], title: str, xlabel: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _curve(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics if m.get(key) is not None]


def write_report(run: Path, summaries: dict[str, dict], lengths: dict[str, float | None],
                 timings: dict[str, float]) -> Path:
    """RUN/report.md: the machine, per-stage wall times, the table and the plots; prints the table."""
    sft = list(read_jsonl(run / "sft" / "metrics.jsonl")) if (run / "sft" / "metrics.jsonl").exists() else []
    rl = list(read_jsonl(run / "grpo" / "metrics.jsonl")) if (run / "grpo" / "metrics.jsonl").exists() else []
    plots = []
    if _plot(run / "sft.png", {"train loss": _curve(sft, "loss"), "eval loss": _curve(sft, "eval/loss")},
             "SFT", "step"):
        plots.append("sft.png")
    if _plot(run / "grpo.png", {"reward": _curve(rl, "reward/mean"), "accuracy": _curve(rl, "accuracy"),
                                "response length": _curve(rl, "response_len/mean")}, "GRPO", "step"):
        plots.append("grpo.png")

    rows = table_rows(summaries, lengths)
    base = summaries.get("base", {})
    lines = [f"# Demo report: {run.name}", "",
             f"Model: {base.get('model', '?')}. Machine: {_cpu_name()}, "
             f"{_cpus()} CPU cores, {platform.system()}. Wall time: {sum(timings.values()) / 60:.1f} min "
             f"({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())}).", "",
             f"Eval: {base.get('overall', {}).get('problems', '?')} held-out problems, n={base.get('n')} "
             f"samples each, sampling {base.get('sampling')}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    _print_table(rows)
    console.print(f"report: {path}")
    return path


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _print_table(rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title="demo: accuracy, format and length per stage")
    for h in HEADER:
        table.add_column(h, justify="left" if h == "stage" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
