"""Two gloo processes under torchrun train like one process at the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.sft import train_sft
from reason.config import dump_config
from reason.records import read_jsonl
from tests.test_sft import one_thread, tiny_config, traces  # noqa: F401  (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "import sys\nfrom reason.config import load_config\nfrom distill.sft import SFTConfig, train_sft\n" \
         "train_sft(load_config(SFTConfig, sys.argv[1]))\n"
STEPS = 4


def _config(tmp_path, out: str, parallel: str = "ddp"):
    # batch 4 = 2 micro-batches of 1 row on each of 2 processes, or 4 micro-batches in one
    return tiny_config(tmp_path, data={"train": [{"path": traces(tmp_path, 60)}]},
                       train={"out_dir": str(tmp_path / out), "batch_size": 4, "micro_batch": 1,
                              "max_steps": STEPS, "parallel": parallel})


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r.get("loss", r.get("eval/loss"))) for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    train_sft(_config(tmp, "one"))
    return tmp, _losses(tmp / "one")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(single, parallel):
    tmp, want = single
    cfg = _config(tmp, f"two-{parallel}", parallel)
    dump_config(cfg, tmp / f"{parallel}.yaml")
    (tmp / "train.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp / "train.py"), str(tmp / f"{parallel}.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = _losses(Path(cfg.train.out_dir))
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4), f"step {step}: {a} vs {b}"
    AutoModelForCausalLM.from_pretrained(Path(cfg.train.out_dir) / "final")  # rank 0 exported a whole model
