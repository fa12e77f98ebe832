"""What the verl bridge tests share: a recipe with a problems file, a GRPO config from
a few sections, and `reason rl` run as a subprocess (optionally under verl's Python)."""
import json
import subprocess
import sys

import pytest
import yaml

from rl.config import GRPOConfig

ARR = "actor_rollout_ref"
PROBLEMS = [
    {"id": "p1", "problem": "What is 2 + 2?", "answer": "4", "source": "toy"},
    {"id": "p2", "problem": "What is 3 * 3?", "answer": "9", "source": "toy"},
    {"id": "p3", "problem": "Is this answered?", "source": "toy"},  # no ground truth: dropped
]


def rl_cli(*args, python=sys.executable, **kw):
    return subprocess.run([str(python), "-c", "from rl.cli import app; app()", *map(str, args)],
                          capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


@pytest.fixture(autouse=True)
def _job_dirs_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # dry runs keep their job dirs; keep them out of /tmp


@pytest.fixture
def recipe(tmp_path):
    """A GRPO recipe YAML with a problems file; returns (path, dict) to tweak and rewrite."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    data = {"model": {"path": "/models/student"}, "data": {"train": str(problems), "validation": str(problems)},
            "rollout": {"max_tokens": 1024, "max_prompt_tokens": 256}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


BASE = {"data": {"train": "problems.jsonl"}, "model": {"path": "/models/student"},
        "train": {"out_dir": "/ckpt/grpo"}}


def make_cfg(**sections) -> GRPOConfig:
    merged = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return GRPOConfig.model_validate(merged)
