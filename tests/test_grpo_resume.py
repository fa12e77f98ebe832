"""Exact resume: a GRPO run killed after a checkpoint and resumed ends where an uninterrupted run ends.

Every piece of state a step reads is switched on (prompt sampler across dynamic
sampling rounds, annealed temperature, warm-up + cosine LR, two epochs, KL to the
reference, entropy bonus, truncated importance sampling, rebalancing, pass-rate
filtering, validation), so any of it restored wrongly shows in the weights or
the metrics. The same holds for a LoRA policy (model.lora), whose state is its
adapters and their AdamW moments, and whose KL reference is itself with adapters off:
the last checkpoints of both runs are equal too, optimizer state included.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from reason.checkpoint import checkpoint_dir, list_checkpoints
from rl.trainer import train_grpo
from components import require
from test_grpo_learning import metrics_rows, recipe, tiny_dir, write_problems  # noqa: F401 (fixture)

STATEFUL = ["train.steps=4", "train.save_every=2", "train.log_samples_every=1", "train.prompts_per_step=3",
            "rollout.group_size=4", "rollout.anneal_to=0.6", "rollout.anneal_steps=3",
            "optim.lr=0.005", "optim.warmup_steps=2", "optim.schedule=cosine",
            "algorithm.epochs=2", "algorithm.kl_beta=0.01", "algorithm.entropy_gamma=0.01", "algorithm.tis_cap=2.0",
            "algorithm.dynamic_sampling=true", "algorithm.max_resample_rounds=2", "algorithm.rebalance=true",
            "algorithm.pass_rate_band=[0.1, 0.9]", "algorithm.loss_agg=seq-mean-token-sum-norm"]


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time", "perf"))} for r in rows]


def _samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _equal(a, b) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):  # a reloaded optimizer's betas come back a list
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


POLICIES = {"full": [], "lora": ["model.lora={r: 8, alpha: 16}", "optim.lr=0.02"]}


@pytest.mark.parametrize("policy", POLICIES)
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_dir, policy):  # noqa: F811
    if policy == "lora":
        require("peft", "peft, the dev extra")
    problems = write_problems(tmp_path / "problems.jsonl", n=10)
    val = write_problems(tmp_path / "val.jsonl", n=2)
    cfg = lambda name, *more: recipe(tmp_path / name, tiny_dir, problems, *STATEFUL,  # noqa: E731
                                     f"data.validation={val}", *POLICIES[policy], *more)
    whole = train_grpo(cfg("whole"))

    # Stop after step 3, then lose its checkpoint as if killed while writing it: resume from step 2.
    stopped = train_grpo(cfg("resumed", "train.stop_after=3"))
    assert stopped.final_dir is None and stopped.step == 3
    shutil.rmtree(checkpoint_dir(stopped.run_dir, 3))
    assert [p.name for p in list_checkpoints(stopped.run_dir)] == ["step-000002"]
    assert [r["step"] for r in metrics_rows(stopped.run_dir)] == [0, 1, 2, 3]  # step 3 is logged, then replayed
    resumed = train_grpo(cfg("resumed"))

    a = load_file(whole.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("model.pt", "optimizer.pt"):  # the adapters (or the model) and their AdamW moments
        saved = [torch.load(checkpoint_dir(r.run_dir, 4) / name, weights_only=False) for r in (whole, resumed)]
        assert _equal(*saved), name
    initial = load_file(tiny_dir / "model.safetensors")
    assert not all(torch.equal(a[k], initial[k]) for k in a)  # it did train
    rows_a, rows_b = metrics_rows(whole.run_dir), metrics_rows(resumed.run_dir)
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    assert _comparable(rows_a) == _comparable(rows_b)
    assert _samples(whole.run_dir) == _samples(resumed.run_dir)
    assert {r["step"] for r in _samples(resumed.run_dir)} == {1, 2, 3, 4}
    temps = [r["temperature"] for r in rows_a[1:]]
    assert temps[0] == 1.0 and temps[-1] == 0.6 and rows_a[-1]["kl"] > 0 and "eval/reward/mean" in rows_a[-1]
