"""Exact resume: a run stopped or SIGKILLed and resumed ends with the uninterrupted run's weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.sft import train_sft
from reason.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from reason.config import dump_config
from reason.records import read_jsonl
from tests.test_sft import one_thread, tiny_config, traces  # noqa: F401  (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
CHILD = "import sys; from reason.config import load_config; from distill.sft import SFTConfig, train_sft; " \
        "train_sft(load_config(SFTConfig, sys.argv[1]))"


def _config(tmp_path, out: str, **train):
    return tiny_config(tmp_path, data={"train": [{"path": traces(tmp_path, 60)}]},
                       train={"out_dir": str(tmp_path / out), "batch_size": 2, "micro_batch": 1,
                              "epochs": 2, "max_steps": STEPS, **train})


def _child(cfg, tmp_path) -> subprocess.Popen:
    path = tmp_path / f"{Path(cfg.train.out_dir).name}.yaml"
    dump_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # same kernels as the test process
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    torch.set_num_threads(1)
    result = train_sft(_config(tmp, "full"))
    return tmp, load_file(result.final_dir / "model.safetensors")


def _assert_same_weights(final_dir: Path, want: dict) -> None:
    got = load_file(final_dir / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ from the uninterrupted run"


def _assert_one_row_per_step(run_dir: Path) -> None:
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(STEPS + 1))


@pytest.mark.slow
def test_stop_then_resume_in_a_fresh_process(uninterrupted):
    tmp, want = uninterrupted
    cfg = _config(tmp, "stopped", stop_after=STEPS // 2)
    first = train_sft(cfg)
    assert first.step == STEPS // 2 and first.final_dir is None
    assert latest_checkpoint(cfg.train.out_dir).name == f"step-{STEPS // 2:06d}"
    child = _child(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_after": None})}), tmp)
    assert child.wait(timeout=300) == 0, child.stderr.read().decode()[-3000:]
    _assert_same_weights(Path(cfg.train.out_dir) / "final", want)
    _assert_one_row_per_step(Path(cfg.train.out_dir))


@pytest.mark.slow
def test_sigkill_then_resume(uninterrupted):
    tmp, want = uninterrupted
    cfg = _config(tmp, "killed", save_every=3)
    run_dir = Path(cfg.train.out_dir)
    child = _child(cfg, tmp)
    while latest_checkpoint(run_dir) is None:  # kill as soon as a first checkpoint exists
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not (run_dir / "final").exists()
    resumed = train_sft(cfg)
    assert resumed.step == STEPS
    _assert_same_weights(resumed.final_dir, want)
    _assert_one_row_per_step(run_dir)


def test_resume_refuses_a_changed_data_plan_or_an_unasked_resume(tmp_path):
    train_sft(_config(tmp_path, "run", stop_after=2))
    with pytest.raises(ValueError, match="training data changed"):
        train_sft(_config(tmp_path, "run").model_copy(update={"data": _config(tmp_path, "run").data.model_copy(
            update={"seed": 1})}))
    with pytest.raises(ValueError, match="train.resume"):
        train_sft(_config(tmp_path, "run", resume=False))


def test_checkpoints_are_whole_or_absent_and_restore_rng(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"data": {"next_step": step}}, keep=2)
    after_save = torch.rand(3)
    torch.rand(5)  # move the RNG on
    torch.save({}, tmp_path / "junk.pt")
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # as left by a run killed mid-write
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    fresh = torch.nn.Linear(4, 4)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt, fresh_sched)
    assert state["step"] == 3 and state["data"]["next_step"] == 3
    assert torch.equal(torch.rand(3), after_save)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_sched.last_epoch == sched.last_epoch


def test_a_failed_checkpoint_write_says_where_and_how_much_space_and_keeps_the_last_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep=1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")  # what torch says when the disk is full
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"step-000002 \(\d+ MiB free on its disk.*iostream error"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the half-written copy frees its space
