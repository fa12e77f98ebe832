"""`reason demo`: the whole Phi-4-reasoning story on a laptop, as the file pipeline a user would type.

Stages (configs/demo/demo.yaml names a recipe for each; every stage is a `reason`
command, run in its own process, reading the previous stage's files):
  1. problems: a held-out set, then SFT and GRPO problems that exclude its prompts
     (reason distill problems --exclude), so no eval prompt is ever trained on
  2. evaluate the base model on the held-out file                  (reason eval)
  3. teacher traces for the SFT problems, filtered                 (reason distill generate, filter)
  4. SFT on the kept traces, Phi-4 format                          (reason distill sft)
  5. evaluate the SFT model
  6. GRPO with the length-aware reward on the GRPO problems        (reason rl train)
  7. evaluate the GRPO model
Optional (`pts` set; off by default), after step 5 and before GRPO, which still starts from the SFT model:
  5a. Pivotal Token Search on the SFT model, on the first `pts_problems` GRPO problems
      (they carry gold answers and share no prompt with the held-out set)   (reason distill pts)
  5b. DPO from the SFT model on those single-token pairs                  (reason distill dpo)
  5c. evaluate the DPO model on the held-out file, as stage "dpo"
then write runs/<name>/report.md (table + PNG plots) and print the table. A stage
whose output exists is reused (trainers also resume mid-run), so a second run is
quick; `--fresh` starts over.
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
from reason.problems import SyntheticSpec


class DemoData(Section):
    """The demo's problem sets; SFT and GRPO problems never share a prompt with the held-out set."""

    heldout: SyntheticSpec = Field(default_factory=lambda: SyntheticSpec(n=500, seed=1234, levels=[0]))
    sft: SyntheticSpec = Field(default_factory=lambda: SyntheticSpec(n=300, seed=0, levels=[0]))
    grpo: SyntheticSpec = Field(default_factory=lambda: SyntheticSpec(n=200, seed=1, levels=[0]))


class DemoConfig(Section):
    name: str = "demo"
    model: str = "default"  # the base model: the embedded SmolLM2-135M-Instruct, or a Hugging Face model dir
    runs_dir: str = "runs"
    data: DemoData = Field(default_factory=DemoData)
    generate: str = "configs/demo/generate.yaml"  # GenerateConfig recipe: the synthetic teacher
    eval: str = "configs/demo/eval.yaml"  # EvalConfig recipe; model, problems and out_dir set per stage
    sft: str = "configs/demo/sft.yaml"  # SFTConfig recipe
    grpo: str = "configs/demo/grpo.yaml"  # GRPOConfig recipe; starts from the SFT model
    # Phi-4's first preference round, optional: a PTSConfig recipe (configs/demo/pts.yaml) turns on
    # PTS on the SFT model, DPO on its pairs (the `dpo` recipe) and an eval of that model as stage "dpo".
    pts: str | None = None
    dpo: str = "configs/demo/dpo.yaml"  # DPOConfig recipe; starts from the SFT model, its reference too
    pts_problems: int = Field(40, ge=1)  # the first N GRPO problems are searched
    overrides: dict[str, list[str]] = Field(default_factory=dict)  # per stage: --set strings
    # The base model is evaluated on the first N held-out problems only: it scores near 0
    # and rambles to max_tokens, so it is the slowest eval and the least informative.
    base_problems: int | None = Field(150, ge=1)


def _reason(run: Path, stage: str, *args: str, stdout: Path | None = None) -> None:
    """Run one stage as its own `reason` command, in a fresh process, and record its wall time
    in RUN/timings.json (so a resumed demo still reports what every stage cost). `stdout`:
    the command's stdout (its data, a JSON report) is kept there once it succeeds.

    Separate processes keep stages from sharing state: a vLLM engine binds CPU
    threads for the life of its process, which would slow a trainer started after it.
    """
    cmd = [sys.executable, "-m", "reason.cli", *args]
    console.print(f"[dim]$ reason {' '.join(args)}[/]", highlight=False)
    start = time.time()
    out = subprocess.run(cmd, stdout=subprocess.PIPE if stdout else None, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"stage failed: reason {' '.join(args)} (fix it, then run the demo again to resume)")
    if stdout:
        stdout.write_text(out.stdout)
    timings = run / "timings.json"
    spent = json.loads(timings.read_text()) if timings.exists() else {}
    spent[stage] = spent.get(stage, 0.0) + time.time() - start
    timings.write_text(json.dumps(spent, indent=1))


def _sets(cfg: DemoConfig, stage: str, *extra: str) -> list[str]:
    return [a for s in [*cfg.overrides.get(stage, []), *extra] for a in ("--set", s)]


def stage_data(cfg: DemoConfig, run: Path) -> dict[str, Path]:
    """The three problem files, the held-out one first so the others exclude its prompts."""
    data = run / "data"
    files = {name: data / f"{name}.jsonl" for name in ("heldout", "sft", "grpo")}
    done: list[Path] = []
    for name, path in files.items():
        spec = getattr(cfg.data, name)
        if not path.exists():
            exclude = [a for p in done for a in ("--exclude", str(p))]
            _reason(run, "problems", "distill", "problems", "--synthetic", str(spec.n), "--seed", str(spec.seed),
                    "--levels", ",".join(map(str, spec.levels)), "--out", str(path), *exclude)
        done.append(path)
    return files


def stage_traces(cfg: DemoConfig, run: Path, problems: Path) -> Path:
    """Teacher traces for the SFT problems, kept only when verified and well formed."""
    traces, kept = run / "data" / "traces.jsonl", run / "data" / "kept.jsonl"
    if not kept.exists():
        _reason(run, "traces", "distill", "generate", "-p", str(problems), "-o", str(traces), "-c", cfg.generate,
                *_sets(cfg, "generate"))
        _reason(run, "traces", "distill", "filter", "--in", str(traces), "--out", str(kept), "--verify", "--format",
                "--dropped", str(run / "data" / "dropped.jsonl"), *_sets(cfg, "filter"))
    return kept


def stage_eval(cfg: DemoConfig, run: Path, stage: str, model: str, heldout: Path, *extra: str) -> None:
    out = run / f"eval-{stage}"
    if not (out / "summary.json").exists():
        console.rule(f"eval: {stage}")
        _reason(run, f"eval-{stage}", "eval", "-c", cfg.eval,
                *_sets(cfg, "eval", f"model={model}", f"problems.path={heldout}", f"out_dir={out}", *extra))


def stage_train(cfg: DemoConfig, run: Path, stage: str, command: list[str], *extra: str) -> Path:
    final = run / stage / "final"
    if not (final / "config.json").exists():  # an interrupted trainer resumes from its checkpoint
        console.rule(stage.upper())
        _reason(run, stage, *command, "-c", getattr(cfg, stage),
                *_sets(cfg, stage, f"train.out_dir={run / stage}", *extra))
    return final


def stage_pts(cfg: DemoConfig, run: Path, sft_model: Path, grpo: Path) -> dict:
    """Pivotal Token Search on the SFT model over the first `pts_problems` GRPO problems; its figures."""
    from reason.demo_report import pts_figures

    out = run / "pts"
    report = out / "report.json"
    if not report.exists():
        console.rule("PTS")
        out.mkdir(exist_ok=True)
        problems = out / "problems.jsonl"
        problems.write_text("".join(grpo.read_text().splitlines(keepends=True)[:cfg.pts_problems]))
        _reason(run, "pts", "distill", "pts", "-p", str(problems), "-o", str(out / "pairs.jsonl"), "-c", cfg.pts,
                *_sets(cfg, "pts", f"model={sft_model}"), stdout=report)
    return pts_figures(report)


def stage_preference(cfg: DemoConfig, run: Path, sft_model: Path, files: dict[str, Path]) -> None:
    """PTS pairs from the SFT model, DPO on them from the SFT model, and its eval as stage "dpo"."""
    if stage_pts(cfg, run, sft_model, files["grpo"])["pairs"] == 0:
        console.print("[yellow]pts found no pairs: no DPO stage[/] (more pts_problems or samples may find some)")
        return
    dpo_model = stage_train(cfg, run, "dpo", ["distill", "dpo"], f"model.path={sft_model}",
                            f"data.train.0.path={run / 'pts' / 'pairs.jsonl'}")
    stage_eval(cfg, run, "dpo", str(dpo_model), files["heldout"])


def run_demo(cfg: DemoConfig, fresh: bool = False) -> Path:
    """Run every stage (reusing finished ones); return the report path."""
    from reason.demo_report import write_report
    from reason.models import resolve

    base = str(resolve(cfg.model, "model"))
    run = Path(cfg.runs_dir) / cfg.name
    if fresh and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "demo.yaml")
    files = stage_data(cfg, run)
    stage_eval(cfg, run, "base", base, files["heldout"], *[f"problems.limit={n}" for n in [cfg.base_problems] if n])
    kept = stage_traces(cfg, run, files["sft"])
    sft_model = stage_train(cfg, run, "sft", ["distill", "sft"], f"model.path={base}", f"data.train.0.path={kept}")
    stage_eval(cfg, run, "sft", str(sft_model), files["heldout"])
    if cfg.pts:
        stage_preference(cfg, run, sft_model, files)
    grpo_model = stage_train(cfg, run, "grpo", ["rl", "train"], f"model.path={sft_model}",
                             f"data.train={files['grpo']}")
    stage_eval(cfg, run, "grpo", str(grpo_model), files["heldout"])
    return write_report(run, json.loads((run / "timings.json").read_text()))
