"""What the peer-comparison benchmarks share: each trainer runs in its own process
(so each peak memory and start-up is its own) and prints one JSON line of results."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_traces(path: Path, n: int, levels: tuple[int, ...], seed: int = 0) -> str:
    """n synthetic problems and the programmatic teacher's trace of each, as Trace JSONL."""
    from distill.synthetic import synthetic_trace
    from reason.records import write_jsonl
    from reason.synthetic import generate_problems

    write_jsonl(path, [synthetic_trace(p, 0, seed) for p in generate_problems(n, seed, levels)])
    return str(path)


def precision(setting: str) -> str:
    """One precision for both trainers, by reason's rule: "bfloat16" or "float32"."""
    from reason.train import compute_dtype, pick_device

    return str(compute_dtype(setting, pick_device("auto"))).removeprefix("torch.")


def run_role(cmd: list[str], role: str, threads: int = 0) -> dict:
    """Run one side of a benchmark; its last stdout line is its JSON result."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{role} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
