"""benchmarks/gpu_check.py runs where the GPU machine leaves it: no pydantic, vLLM, Ray or FastAPI, no install.

Timings are not asserted (the smoke model is tiny); what is checked is that the script
runs from the repository root on torch and transformers alone, says plainly when there is
no GPU, and prints every phase, the padded and packed GRPO updates agreeing on the loss.
"""
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# What is absent there: importing any of these raises ImportError, as on that machine.
RUN = ("import runpy, sys\n"
       "for name in ('pydantic', 'pydantic_core', 'vllm', 'ray', 'fastapi'): sys.modules[name] = None\n"
       "sys.argv = ['benchmarks/gpu_check.py', *sys.argv[1:]]\n"
       "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")


def _run(*args):
    return subprocess.run([sys.executable, "-c", RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "OMP_NUM_THREADS": "1"})


def test_without_a_gpu_it_says_so_and_measures_nothing():
    if torch.cuda.is_available():
        return  # a GPU machine measures; this is about the CPU one
    r = _run()
    assert r.returncode == 1 and "no CUDA device is visible" in r.stderr and "Traceback" not in r.stderr


def test_cpu_smoke_prints_every_phase_without_the_config_layer():
    r = _run("--cpu-smoke")
    assert r.returncode == 0, r.stderr[-3000:]
    for phase in ("SFT, packed", "GRPO rollouts (HF generate)", "GRPO update, padded micro-batches",
                  "GRPO update, packed micro-batches", "LoRA GRPO"):
        assert phase in r.stdout
    losses = re.findall(r"GRPO update, \w+ micro-batches.*loss ([-+.\d]+)", r.stdout)
    assert len(losses) == 2 and abs(float(losses[0]) - float(losses[1])) < 1e-3, r.stdout
    packed = next(line for line in r.stdout.splitlines() if line.startswith("GRPO update, packed"))
    assert "padded 0.0%" in packed  # no padding reaches the decoder
