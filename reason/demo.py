"""`reason demo`: the whole Phi-4-reasoning story on a laptop, as one recipe.

Stages (configs/demo/demo.yaml names a recipe for each; every stage is also a
command a user can run alone):
  1. evaluate the base model on held-out synthetic problems   (reason eval)
  2. distil: SFT on verified synthetic traces, Phi-4 format    (reason distill sft)
  3. evaluate the SFT model
  4. GRPO with the length-aware reward on vLLM rollouts        (reason rl train)
  5. evaluate the GRPO model
then write runs/<name>/report.md (table + PNG plots) and print the table.
A stage whose output exists is reused (trainers also resume mid-run), so a second
run is quick; `--fresh` starts over.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field

from reason.config import Section, dump_config
from reason.console import console
from reason.records import read_jsonl


class DemoConfig(Section):
    name: str = "demo"
    model: str = "default"  # the base model: the embedded SmolLM2-135M-Instruct, or a Hugging Face model dir
    runs_dir: str = "runs"
    eval: str = "configs/demo/eval.yaml"  # EvalConfig recipe; model and out_dir set per stage
    sft: str = "configs/demo/sft.yaml"  # SFTConfig recipe
    grpo: str = "configs/demo/grpo.yaml"  # GRPOConfig recipe; starts from the SFT model
    overrides: dict[str, list[str]] = Field(default_factory=dict)  # per stage: --set strings


def _reason(run: Path, stage: str, *args: str) -> None:
    """Run one stage as its own `reason` command, in a fresh process, and record its wall time
    in RUN/timings.json (so a resumed demo still reports what every stage cost).

    Separate processes keep stages from sharing state: a vLLM engine binds CPU
    threads for the life of its process, which would slow a trainer started after it.
    """
    cmd = [sys.executable, "-m", "reason.cli", *args]
    console.print(f"[dim]$ reason {' '.join(args)}[/]", highlight=False)
    start = time.time()
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"stage failed: reason {' '.join(args)} (fix it, then run the demo again to resume)")
    timings = run / "timings.json"
    spent = json.loads(timings.read_text()) if timings.exists() else {}
    spent[stage] = spent.get(stage, 0.0) + time.time() - start
    timings.write_text(json.dumps(spent, indent=1))


def _sets(cfg: DemoConfig, stage: str, *extra: str) -> list[str]:
    return [a for s in [*cfg.overrides.get(stage, []), *extra] for a in ("--set", s)]


def _stage_eval(cfg: DemoConfig, run: Path, stage: str, model: str) -> dict:
    out = run / f"eval-{stage}"
    if not (out / "summary.json").exists():
        console.rule(f"eval: {stage}")
        _reason(run, f"eval-{stage}", "eval", "-c", cfg.eval, *_sets(cfg, "eval", f"model={model}", f"out_dir={out}"))
    return json.loads((out / "summary.json").read_text())


def _stage_train(cfg: DemoConfig, run: Path, stage: str, command: list[str], *extra: str) -> Path:
    final = run / stage / "final"
    if not (final / "config.json").exists():  # an interrupted trainer resumes from its checkpoint
        console.rule(stage.upper())
        _reason(run, stage, *command, "-c", getattr(cfg, stage), *_sets(cfg, stage, f"train.out_dir={run / stage}", *extra))
    return final


def _correct_length(eval_dir: Path) -> float | None:
    """Mean token length of the correct answers (the length control at work)."""
    lengths = [r["num_tokens"] for r in read_jsonl(eval_dir / "samples.jsonl") if r.get("correct")]
    return sum(lengths) / len(lengths) if lengths else None


def run_demo(cfg: DemoConfig, fresh: bool = False) -> Path:
    """Run every stage (reusing finished ones); return the report path."""
    from reason.demo_report import write_report
    from reason.models import resolve

    run = Path(cfg.runs_dir) / cfg.name
    if fresh and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "demo.yaml")
    base = str(resolve(cfg.model))
    summaries = {"base": _stage_eval(cfg, run, "base", base)}
    sft_model = _stage_train(cfg, run, "sft", ["distill", "sft"], f"model.path={base}")
    summaries["sft"] = _stage_eval(cfg, run, "sft", str(sft_model))
    grpo_model = _stage_train(cfg, run, "grpo", ["rl", "train"], f"model.path={sft_model}")
    summaries["grpo"] = _stage_eval(cfg, run, "grpo", str(grpo_model))
    lengths = {stage: _correct_length(run / f"eval-{stage}") for stage in summaries}
    return write_report(run, summaries, lengths, json.loads((run / "timings.json").read_text()))
