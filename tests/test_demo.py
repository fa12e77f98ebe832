"""`reason demo` end to end on a tiny model: every stage runs as its own command and
reads the previous stage's files, no eval prompt is ever trained on, the report
(table, plots, per-stage wall times) is written, a second run reuses every finished
stage, and --fresh starts over."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]

# Tiny and fast: HF generate (no vLLM start-up), a handful of problems, 2 steps per trainer; float32
# on every CPU (the committed demo computes in bf16 where the CPU has bf16 matmuls), so every machine
# runs these the same way.
OVERRIDES = {
    "eval": ["engine=hf", "sampling.max_tokens=12", "dtype=float32"],
    "sft": ["train.max_steps=2", "train.batch_size=2", "train.micro_batch=1", "train.autocast=none"],
    "grpo": ["rollout.engine=hf", "train.steps=2", "rollout.group_size=4", "train.prompts_per_step=2",
             "rollout.max_tokens=12", "train.micro_batch=4", "train.autocast=none"],
}
DATA = {"heldout": {"n": 4, "seed": 1234, "levels": [0, 0, 1]}, "sft": {"n": 12, "seed": 0, "levels": [0]},
        "grpo": {"n": 8, "seed": 1, "levels": [0]}}


def demo(tmp_path: Path, *extra: str, data: dict = DATA) -> subprocess.CompletedProcess:
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "model": str(tmp_path / "base"), "data": data, "base_problems": 3,
                                      "runs_dir": str(tmp_path / "runs"), "overrides": OVERRIDES}))
    cmd = [sys.executable, "-m", "reason.cli", "demo", "-c", str(recipe), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_demo_runs_every_stage_reports_and_resumes(tmp_path):
    save_tiny(tmp_path / "base")
    out = demo(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    for stage, n in (("base", 3), ("sft", 4), ("grpo", 4)):
        summary = json.loads((run / f"eval-{stage}" / "summary.json").read_text())
        assert summary["overall"]["problems"] == n
    assert (run / "sft" / "final" / "model.safetensors").exists()
    assert (run / "grpo" / "final" / "model.safetensors").exists()
    report = (run / "report.md").read_text()
    for stage in ("| base |", "| sft |", "| grpo |", "sft.png", "grpo.png", "accuracy.png", "Wall time",
                  "GRPO - SFT", "carries or borrows", "computed in float32"):
        assert stage in report
    for png in ("sft.png", "grpo.png", "accuracy.png"):
        assert (run / png).stat().st_size > 0
    figures = json.loads((run / "summary.json").read_text())  # the schema, fractions
    for stage, n in (("base", 3), ("sft", 4), ("grpo", 4)):
        s = figures["stages"][stage]
        assert s["n_problems"] == n and s["n_samples"] == 2 * n
        assert 0 <= s["ci"][0] <= s["pass1"] <= s["ci"][1] <= 1
    d = figures["grpo_minus_sft"]
    assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["n_problems"] == 4
    assert figures["wall_minutes"] > 0 and isinstance(figures["cpu_flags"], list)
    assert figures["eval"]["dtype"] == "float32"  # the precision the overrides pin
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {"problems", "eval-base", "traces", "sft", "eval-sft", "grpo", "eval-grpo"}
    assert not (run / "pts").exists() and "dpo" not in figures["stages"] and "pts" not in figures  # off by default
    # the stages read each other's files: SFT trained on the kept traces of the SFT problems, GRPO on its file
    sft_cfg = yaml.safe_load((run / "sft" / "config.yaml").read_text())
    assert sft_cfg["data"]["train"][0]["path"] == str(run / "data" / "kept.jsonl")
    grpo_cfg = yaml.safe_load((run / "grpo" / "config.yaml").read_text())
    assert grpo_cfg["data"]["train"]["path"] == str(run / "data" / "grpo.jsonl")
    assert_heldout_is_never_trained_on(run)

    again = demo(tmp_path)  # every stage's output exists: nothing re-runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "timings.json").read_text()) == timings
    assert "$ reason" not in again.stderr + again.stdout

    fresh = demo(tmp_path, "--fresh", "--set", "overrides.sft.0=train.max_steps=1")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    sft_steps = [json.loads(line)["step"] for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert max(sft_steps) == 1  # the SFT stage ran again, from scratch


def test_demo_bad_config_key_names_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "reason.cli", "demo", "--set", "nmae=x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "nmae" in out.stderr + out.stdout


def prompts(path: Path) -> set[str]:
    from reason.records import read_jsonl

    return {(r["problem"] if "problem" in r else r)["prompt"] for r in read_jsonl(path)}


def assert_heldout_is_never_trained_on(run: Path) -> None:
    heldout = prompts(run / "data" / "heldout.jsonl")
    assert heldout
    for trained in ("sft.jsonl", "kept.jsonl", "grpo.jsonl"):
        assert not heldout & prompts(run / "data" / trained), trained
    evaluated = {r["id"] for r in map(json.loads, (run / "eval-sft" / "samples.jsonl").read_text().splitlines())}
    assert evaluated == {json.loads(line)["id"] for line in (run / "data" / "heldout.jsonl").read_text().splitlines()}


def test_demo_problem_sets_are_disjoint_at_the_committed_sizes(tmp_path):
    """The recipe's own sizes: a held-out set of the committed demo shares no prompt with its training sets."""
    from reason.config import load_config
    from reason.demo import DemoConfig, stage_data

    cfg = load_config(DemoConfig, ROOT / "configs" / "demo" / "demo.yaml", [f"runs_dir={tmp_path}"])
    files = stage_data(cfg, tmp_path / "demo")
    heldout = prompts(files["heldout"])
    assert len(heldout) == cfg.data.heldout.n
    assert not heldout & prompts(files["sft"]) and not heldout & prompts(files["grpo"])


PTS_OVERRIDES = {  # the taught model answers without a system prompt; a tiny search on HF generate
    "pts": ["engine=hf", "samples=4", "max_tokens=40", "chat.system_prompt=null", "batch=4", "dtype=float32"],
    "dpo": ["train.batch_size=1", "train.micro_batch=1", "train.autocast=none"],
}


def taught_base(tmp_path: Path, recipe: dict) -> Path:
    """A tiny model that answers each of the demo's GRPO problems right about half the time
    (the right sum, or one more), so PTS finds problems in its band and pivots in the answer."""
    from reason.config import load_config
    from reason.demo import DemoConfig, stage_data
    from reason.records import read_jsonl
    from tiny import save_taught

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    files = stage_data(load_config(DemoConfig, path, []), tmp_path / "runs" / "t")
    shared = "<think>\nFirst, add the numbers. Then check the result.\n</think>\n\nThe answer is \\boxed{"
    prompts, responses = [], []
    for p in read_jsonl(files["grpo"]):
        prompts += [p["prompt"]] * 2
        responses += [f"{shared}{p['ground_truth']}}}.", f"{shared}{int(p['ground_truth']) + 1}}}."]
    return save_taught(tmp_path / "base", prompts, responses, steps=200, paired=True)


@pytest.mark.slow
def test_demo_pts_stage_searches_the_sft_model_trains_dpo_and_reports_it(tmp_path):
    data = {**DATA, "grpo": {"n": 4, "seed": 1, "levels": [0]}}
    recipe = {"name": "t", "model": str(tmp_path / "base"), "data": data, "base_problems": 3,
              "runs_dir": str(tmp_path / "runs"), "overrides": {**OVERRIDES, **PTS_OVERRIDES},
              "pts": "configs/demo/pts.yaml", "pts_problems": 4}
    taught_base(tmp_path, recipe)
    out = subprocess.run([sys.executable, "-m", "reason.cli", "demo", "-c", str(tmp_path / "recipe.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    pairs = [json.loads(line) for line in (run / "pts" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and {p["metadata"]["model"] for p in pairs} == {str(run / "sft" / "final")}
    grpo_ids = {json.loads(line)["id"] for line in (run / "data" / "grpo.jsonl").read_text().splitlines()}
    assert {p["problem_id"] for p in pairs} <= grpo_ids  # searched GRPO problems, never held-out ones
    dpo_cfg = yaml.safe_load((run / "dpo" / "config.yaml").read_text())
    assert dpo_cfg["model"]["path"] == str(run / "sft" / "final")
    assert dpo_cfg["data"]["train"][0]["path"] == str(run / "pts" / "pairs.jsonl")
    assert json.loads((run / "eval-dpo" / "summary.json").read_text())["overall"]["problems"] == 4
    grpo_cfg = yaml.safe_load((run / "grpo" / "config.yaml").read_text())
    assert grpo_cfg["model"]["path"] == str(run / "sft" / "final")  # GRPO still starts from SFT
    report = (run / "report.md").read_text()
    assert "| dpo |" in report and "DPO - SFT" in report and f"{len(pairs)} pairs" in report
    figures = json.loads((run / "summary.json").read_text())
    assert list(figures["stages"]) == ["base", "sft", "dpo", "grpo"]
    d = figures["dpo_minus_sft"]
    assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["n_problems"] == 4
    assert figures["pts"]["pairs"] == len(pairs) and figures["pts"]["problems"] == 4
    assert {"pts", "dpo", "eval-dpo"} <= set(json.loads((run / "timings.json").read_text()))


def test_the_default_demo_has_no_pts_stage():
    from reason.config import load_config
    from reason.demo import DemoConfig

    assert load_config(DemoConfig, ROOT / "configs" / "demo" / "demo.yaml", []).pts is None
    assert DemoConfig().pts is None
