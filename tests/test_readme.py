"""The README's stage block runs as written, each command reading the previous one's output.

The commands are taken from README.md verbatim and run in a scratch directory (with the
project's configs/ beside them), in order; each gets overrides appended that swap in a
tiny model, Hugging Face generate and small sizes, and nothing else. Then the files are
checked: every stage read what the stage before it wrote.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reason.records import read_jsonl
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
TINY_CHAT = ["chat.think_token_ids=[<|dummy_0|>, <|dummy_1|>]"]  # the tiny vocab's placeholders, as Phi-4's


def stage_block() -> list[list[str]]:
    """The `reason ...` commands of the README's "The stages, one command each" block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The stages, one command each"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines() if line.startswith("reason ")]


def tiny_overrides(args: list[str], model: Path) -> list[str]:
    """What each command gets appended: a tiny model and small sizes."""
    stage = args[1] if args[1] == "eval" else " ".join(args[1:3])
    sets = {
        "distill select": [f"model={model}", "engine=hf", "n=2", "max_tokens=4", "band=[0.0, 1.0]",
                           "verify.workers=1", "chat.system_prompt=null", "batch=256"],
        "distill sft": [f"model.path={model}", *TINY_CHAT, "data.max_len=1024", "train.batch_size=2",
                        "train.micro_batch=1", "train.max_steps=2", "train.autocast=none", "train.parallel=ddp"],
        "rl train": [*TINY_CHAT, "rollout.engine=hf", "rollout.group_size=2", "rollout.max_tokens=8",
                     "train.steps=1", "train.prompts_per_step=2", "train.micro_batch=4", "train.autocast=none",
                     "reward.workers=1"],
        "eval": ["engine=hf", "dtype=float32", "sampling.n=1", "sampling.max_tokens=8", "problems.limit=10",
                 "reward.workers=1"],
    }.get(stage, [])
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.slow
def test_readme_stage_block_chains_file_to_file(tmp_path):
    commands = stage_block()
    assert [c[:3] for c in commands] == [["reason", "distill", "problems"], ["reason", "distill", "select"],
                                         ["reason", "distill", "generate"], ["reason", "distill", "filter"],
                                         ["reason", "distill", "sft"], ["reason", "rl", "train"],
                                         ["reason", "eval", "-c"]]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    model = save_tiny(tmp_path / "tiny")
    for args in commands:
        cmd = [sys.executable, "-m", "reason.cli", *args[1:], *tiny_overrides(args, model)]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stderr[-3000:]}"

    rows = lambda name: list(read_jsonl(tmp_path / name))  # noqa: E731
    problems, heldout = rows("problems.jsonl"), rows("heldout.jsonl")
    assert (len(problems), len(heldout)) == (2000, 200)
    teachable = rows("teachable.jsonl")
    assert {p["id"] for p in teachable} <= {p["id"] for p in problems} and teachable
    traces = rows("traces.jsonl")
    assert {t["problem"]["id"] for t in traces} == {p["id"] for p in teachable}  # generate read select's output
    kept = rows("kept.jsonl")
    assert 0 < len(kept) <= len(traces) and not {t["problem"]["prompt"] for t in kept} & {p["prompt"] for p in heldout}
    sft = yaml.safe_load((tmp_path / "runs" / "phi4-reasoning-sft" / "config.yaml").read_text())
    assert sft["data"]["train"][0]["path"] == "kept.jsonl"
    grpo = yaml.safe_load((tmp_path / "runs" / "phi4-reasoning-plus" / "config.yaml").read_text())
    assert grpo["model"]["path"] == "runs/phi4-reasoning-sft/final"
    assert grpo["data"]["train"]["path"] == "teachable.jsonl"
    summary = json.loads((tmp_path / "runs" / "eval" / "phi4" / "summary.json").read_text())
    assert summary["model"] == "runs/phi4-reasoning-plus/final"
    assert summary["config"]["problems"]["path"] == "heldout.jsonl" and summary["overall"]["problems"] == 10
