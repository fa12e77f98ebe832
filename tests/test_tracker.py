"""Training metrics reach every backend a recipe names, and can be read back from each."""
from __future__ import annotations

import math

import pytest

from components import require
from reason.records import read_jsonl
from reason.tracker import Tracker, TrackerConfig


def test_jsonl_rows_are_written_cleaned_and_restarted(tmp_path):
    tracker = Tracker(tmp_path, TrackerConfig(backends=["jsonl"]))
    tracker.log(1, {"loss": 2.5, "bad": float("nan")})
    tracker.close()
    assert [(r["step"], r["loss"], r["bad"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 2.5, None)]
    Tracker(tmp_path, TrackerConfig(backends=["jsonl"]), resume_step=None).close()  # a fresh run starts clean
    assert list(read_jsonl(tmp_path / "metrics.jsonl")) == []


def test_tensorboard_events_read_back(tmp_path):
    require("tensorboard", "tensorboard, the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(tmp_path, TrackerConfig(backends=["jsonl", "tensorboard"]))
    for step, loss in ((1, 2.5), (2, 1.5), (3, float("inf"))):
        tracker.log(step, {"loss": loss, "lr": 1e-4 * step})
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 1.5)]  # inf is not a number
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3]
    assert math.isclose(events.Scalars("lr")[-1].value, 3e-4, rel_tol=1e-6)


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    require("wandb", "wandb, the dev extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path, TrackerConfig(backends=["wandb"], project="reason-test", run_name="t"))
    tracker.log(1, {"loss": 2.71828})
    tracker.log(2, {"loss": 1.41421})
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    written = runs[0].read_bytes()  # W&B's own record file: the logged values are in it
    assert b"loss" in written and b"2.71828" in written and b"1.41421" in written


def test_a_backend_that_is_not_installed_is_named(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="tracker.backends: .wandb. needs the wandb package: pip install wandb"):
        Tracker(tmp_path, TrackerConfig(backends=["wandb"]))
