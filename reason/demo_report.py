"""The demo's report: what each stage scores on the held-out set, with intervals, and plots.

Reads only what the stages wrote (each eval's samples.jsonl and summary.json, the
held-out problems, the trainers' metrics.jsonl), so a finished run's report can be
rebuilt without re-running anything. Writes RUN/report.md, RUN/summary.json and PNGs.

The numbers a reader needs to believe "GRPO adds accuracy": every stage's pass@1 with
a 95% bootstrap interval over problems, and GRPO - SFT as a *paired* difference on the
same problems (reason.passk.bootstrap_ci); lengths overall, of correct and of wrong
answers (Phi-4-reasoning-plus thought longer and gained); accuracy by difficulty; the
SFT model's pass@k beside GRPO's pass@1 (how much of its reach RL made first-try).
When the optional preference stage ran (RUN/eval-dpo), its row, DPO - SFT paired the same
way, and what Pivotal Token Search found (RUN/pts/report.json).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from reason.console import console
from reason.passk import bootstrap_ci, mean, pass1_mean
from reason.records import Problem, read_jsonl
from reason.synthetic import regroupings

COLORS = {"base": "#999999", "sft": "#4c72b0", "dpo": "#55a868", "grpo": "#dd8452"}
WORKED = "column by column"  # the first line of every worked demo trace; a glance has none


def per_problem(rows: list[dict]) -> dict[str, float]:
    """Each problem's pass@1 over its samples with a verdict, by problem id."""
    verdicts: dict[str, list[bool]] = {}
    for r in rows:
        if r["correct"] is not None:
            verdicts.setdefault(r["id"], []).append(r["correct"])
    return {pid: pass1_mean(v) for pid, v in verdicts.items()}


def stage_stats(rows: list[dict], summary: dict, problems: dict[str, Problem]) -> dict:
    """One stage's figures (fractions and token counts) from its eval rows."""
    scores = per_problem(rows)
    overall = summary["overall"]
    judged = [r for r in rows if r["correct"] is not None]
    by_difficulty: dict[str, list[float]] = {}
    for pid, score in scores.items():
        by_difficulty.setdefault(str(regroupings(problems[pid])), []).append(score)
    return {
        "pass1": mean(scores.values()), "ci": list(bootstrap_ci(list(scores.values()))),
        "n_problems": len(scores), "n_samples": len(judged),
        "pass_at_k": {k: v for k, v in overall.items() if k.startswith("pass@") and k[5:].isdigit()},
        "worked": mean(WORKED in r["completion"] for r in rows),
        "mean_tokens": mean(r["num_tokens"] for r in rows),
        "mean_tokens_correct": mean(r["num_tokens"] for r in judged if r["correct"]),
        "mean_tokens_wrong": mean(r["num_tokens"] for r in judged if not r["correct"]),
        "format_ok": 1 - overall["format_violation_rate"], "truncated": overall["truncation_rate"],
        "by_difficulty": {d: mean(v) for d, v in sorted(by_difficulty.items())},
    }


def paired_difference(after: list[dict], before: list[dict]) -> dict:
    """pass@1(after) - pass@1(before) on the problems both scored, with its paired 95% interval."""
    a, b = per_problem(after), per_problem(before)
    common = sorted(a.keys() & b.keys())
    diffs = [a[p] - b[p] for p in common]
    return {"diff": mean(diffs), "ci": list(bootstrap_ci(diffs)), "n_problems": len(common)}


def build_summary(run: Path, timings: dict[str, float]) -> dict:
    """summary.json's content, from the run directory alone."""
    problems = {p.id: p for p in map(Problem.model_validate, read_jsonl(run / "data" / "heldout.jsonl"))}
    rows, stages, evals = {}, {}, {}
    optional = ["dpo"] if (run / "eval-dpo" / "summary.json").exists() else []
    for stage in ("base", "sft", *optional, "grpo"):
        out = run / f"eval-{stage}"
        rows[stage] = list(read_jsonl(out / "samples.jsonl"))
        evals[stage] = json.loads((out / "summary.json").read_text())
        stages[stage] = stage_stats(rows[stage], evals[stage], problems)
    pts = run / "pts" / "report.json"
    return {
        "stages": stages,
        "grpo_minus_sft": paired_difference(rows["grpo"], rows["sft"]),
        "sft_minus_base": paired_difference(rows["sft"], rows["base"]),
        **({"dpo_minus_sft": paired_difference(rows["dpo"], rows["sft"])} if optional else {}),
        **({"pts": pts_figures(pts)} if pts.exists() else {}),
        # the compute dtype: bf16 and float32 CPUs sample differently, so it says which table this is
        "eval": {k: evals["sft"].get(k) for k in ("n", "sampling", "dtype")},
        "wall_minutes": round(sum(timings.values()) / 60, 2),
        "stage_minutes": {k: round(v / 60, 2) for k, v in timings.items()},
        "cpu_flags": cpu_flags(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
    }


def pts_figures(report: Path) -> dict:
    """What `reason distill pts` reported (its stdout's JSON line), the figures the report shows."""
    r = json.loads(report.read_text().strip().splitlines()[-1])
    return {k: r[k] for k in ("problems", "searched", "skipped", "pivots", "pairs", "estimates", "scan_estimates")}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _pts(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ci(ci, fmt=_pct) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


HEADER = ["stage", "pass@1 [95% CI]", "problems x samples", "worked it out", "mean length", "correct",
          "wrong", "format ok", "truncated"]


def table_rows(summary: dict) -> list[list[str]]:
    return [[stage, f"{_pct(s['pass1'])} {_ci(s['ci'])}", f"{s['n_problems']} x {s['n_samples'] // max(s['n_problems'], 1)}",
             _pct(s["worked"]), _num(s["mean_tokens"]), _num(s["mean_tokens_correct"]), _num(s["mean_tokens_wrong"]),
             _pct(s["format_ok"]), _pct(s["truncated"])] for stage, s in summary["stages"].items()]


def _difficulty_lines(summary: dict) -> list[str]:
    stages = summary["stages"]
    levels = sorted({d for s in stages.values() for d in s["by_difficulty"]})
    lines = ["| carries or borrows | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    return lines + [f"| {d} | " + " | ".join(_pct(s["by_difficulty"].get(d)) for s in stages.values()) + " |"
                    for d in levels]


def _findings(summary: dict) -> list[str]:
    st, d = summary["stages"], summary["grpo_minus_sft"]
    sft_k = {k: v for k, v in st["sft"]["pass_at_k"].items() if k != "pass@1"}
    reach = ", ".join(f"{k} {_pct(v)}" for k, v in sft_k.items())
    return [f"GRPO - SFT: **{_pts(d['diff'])} points** {_ci(d['ci'], _pts)} (paired bootstrap over the "
            f"{d['n_problems']} problems both scored, 95%).",
            f"SFT - base: {_pts(summary['sft_minus_base']['diff'])} points "
            f"{_ci(summary['sft_minus_base']['ci'], _pts)} on the {summary['sft_minus_base']['n_problems']} "
            "problems the base model was evaluated on.",
            f"The SFT model's reach: pass@1 {_pct(st['sft']['pass1'])}, {reach}; after GRPO, pass@1 "
            f"{_pct(st['grpo']['pass1'])}."] + _preference_findings(summary)


def _preference_findings(summary: dict) -> list[str]:
    lines = []
    if "pts" in summary:
        p = summary["pts"]
        skipped = ", ".join(f"{why} {n}" for why, n in sorted(p["skipped"].items())) or "none"
        lines.append(f"PTS on the SFT model: {p['searched']} of {p['problems']} GRPO problems searched (skipped: "
                     f"{skipped}); {p['pivots']} pivotal tokens, {p['pairs']} pairs; {p['estimates']} prefixes "
                     f"sampled (a token-by-token scan: {p['scan_estimates']}).")
    if "dpo_minus_sft" in summary:
        d = summary["dpo_minus_sft"]
        lines.append(f"DPO - SFT: **{_pts(d['diff'])} points** {_ci(d['ci'], _pts)} (paired, the same "
                     f"{d['n_problems']} problems; DPO on the PTS pairs, from the SFT model).")
    return lines


def write_report(run: Path, timings: dict[str, float]) -> Path:
    """RUN/report.md and RUN/summary.json from the run's files; prints the table."""
    summary = build_summary(run, timings)
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots = _plots(run, summary)
    ev = summary["eval"]
    lines = [f"# Demo report: {run.name}", "",
             f"Machine: {summary['machine']}, CPU flags {' '.join(summary['cpu_flags']) or '-'}. "
             f"Wall time: {summary['wall_minutes']:.1f} min "
             f"({', '.join(f'{k} {v:.1f}' for k, v in summary['stage_minutes'].items())}).", "",
             f"Eval: held-out problems, n={ev['n']} samples each, computed in {ev['dtype'] or '-'}, "
             f"sampling {ev['sampling']}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary)]
    lines += [""] + [f"- {f}" for f in _findings(summary)] + ["", "Accuracy by difficulty:", ""]
    lines += _difficulty_lines(summary) + [""] + [f"![{p}]({p})" for p in plots]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    _print_table(summary)
    console.print(f"report: {path}")
    return path


def _plots(run: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def metrics(stage: str) -> list[dict]:
        path = run / stage / "metrics.jsonl"
        return list(read_jsonl(path)) if path.exists() else []

    def curve(ms: list[dict], key: str) -> list[tuple[int, float]]:
        return [(m["step"], m[key]) for m in ms if m.get(key) is not None]

    written = []
    sft, rl = metrics("sft"), metrics("grpo")
    for name, series in [("sft.png", {"train loss": curve(sft, "loss"), "eval loss": curve(sft, "eval/loss")}),
                         ("grpo.png", {"reward": curve(rl, "reward/mean"), "accuracy": curve(rl, "accuracy"),
                                       "response length": curve(rl, "response_len/mean")})]:
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
        for ax, (title, points) in zip(axes[0], series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
        fig.suptitle(name.removesuffix(".png").upper())
        fig.tight_layout()
        fig.savefig(run / name, dpi=110)
        plt.close(fig)
        written.append(name)

    stages = summary["stages"]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    p1 = [100 * s["pass1"] for s in stages.values()]
    err = [[100 * (s["pass1"] - s["ci"][0]) for s in stages.values()],
           [100 * (s["ci"][1] - s["pass1"]) for s in stages.values()]]
    ax.bar(list(stages), p1, yerr=err, capsize=6, color=[COLORS[s] for s in stages])
    ax.set(ylabel="held-out pass@1 (%)", title="accuracy by stage (95% CI)", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "accuracy.png", dpi=110)
    plt.close(fig)
    return [*written, "accuracy.png"]


def cpu_flags() -> list[str]:
    """The flags the demo's speed and floating-point results depend on, as `lscpu` reports them."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({f for f in ("avx2", "avx512_bf16") if f in out.split()})


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def _print_table(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="demo: held-out accuracy, behaviour and length per stage")
    for h in HEADER:
        table.add_column(h, justify="left" if h == "stage" else "right")
    for r in table_rows(summary):
        table.add_row(*r)
    console.print(table)
    for f in _findings(summary):
        console.print(f.replace("**", ""))
