"""`reason distill generate` against a REAL vLLM OpenAI server (and the local vLLM engine).

The server runs a tiny random model on 127.0.0.1. A random model writes no think
blocks, so the requests carry vLLM's `structured_outputs` regex (through
`extra_body`) to make its text the shape of a real teacher trace; everything else
(chat template, n samples per request, sampling, HTTP) is the real thing.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from reason.records import Problem, Trace, read_jsonl, write_jsonl
from test_distill_generate import ROOT, _cli, run_until_killed
from tiny import save_tiny

pytestmark = pytest.mark.slow

TRACE_REGEX = r"<think>\n[a-z ]{5,40}\n</think>\n\nThe answer is \\boxed\{[0-9]{1,3}\}\."
SERVED_NAME = "tiny-teacher"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (the API server and its engine core)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not come up:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if SERVED_NAME in r.read().decode():
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        _stop(proc)


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"q{i}", prompt=f"What is {i} + {i}?", ground_truth=str(2 * i)) for i in range(n)]


def _setup(tmp_path: Path, url: str, n: int, **cfg) -> tuple[list[str], list[Problem]]:
    problems = _problems(n)
    write_jsonl(tmp_path / "problems.jsonl", problems)
    config = {"engine": "openai", "model": SERVED_NAME, "base_url": url, "temperature": 1.0, "top_p": 1.0,
              "max_tokens": 200, "retries": 3, "timeout": 120,
              "extra_body": {"structured_outputs": {"regex": TRACE_REGEX}}, **cfg}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(config))
    args = ["--problems", str(tmp_path / "problems.jsonl"), "--out", str(tmp_path / "traces.jsonl"),
            "--config", str(tmp_path / "gen.yaml")]
    return args, problems


def _run(args: list[str]) -> dict:
    done = subprocess.run(_cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # the report is the last line; vLLM logs to stdout too


def test_generate_against_a_real_vllm_server(server, tmp_path):
    args, problems = _setup(tmp_path, server, n=4, k=3, n_per_request=3, concurrency=2)
    report = _run(args)
    assert (report["total"], report["generated"], report["failed"], report["missing"]) == (12, 12, 0, 0)
    traces = list(read_jsonl(tmp_path / "traces.jsonl", Trace))
    assert Counter(t.problem.id for t in traces) == {p.id: 3 for p in problems}
    assert sorted((t.problem.id, t.sample) for t in traces) == sorted((p.id, s) for p in problems for s in range(3))
    for t in traces:
        assert (t.teacher, t.sampling["style"], t.sampling["finish_reason"]) == (SERVED_NAME, "think", "stop")
        assert 5 <= len(t.reasoning) <= 40 and t.answer.startswith("The answer is \\boxed{")
    assert _run(args)["done_before"] == 12  # a finished run has nothing left to do


def test_kill_and_resume_against_a_real_vllm_server(server, tmp_path):
    args, problems = _setup(tmp_path, server, n=10, k=2, n_per_request=1, concurrency=1)
    out = tmp_path / "traces.jsonl"
    killed_at = run_until_killed(_cli(*args), out, min_lines=3)
    assert 3 <= killed_at < 20
    report = _run(args)
    assert (report["done_before"], report["generated"], report["failed"], report["missing"]) == (
        killed_at, 20 - killed_at, 0, 0)
    pairs = Counter((t.problem.id, t.sample) for t in read_jsonl(out, Trace))
    assert set(pairs) == {(p.id, s) for p in problems for s in range(2)}
    assert set(pairs.values()) == {1}


def test_local_vllm_engine_accounts_for_every_pair(tiny_dir, tmp_path):
    """The in-process engine samples for real; a random model's text has no think block
    or boxed answer, so every pair must come back as a counted failure, none lost."""
    problems = _problems(3)
    write_jsonl(tmp_path / "problems.jsonl", problems)
    report = _run(["--problems", str(tmp_path / "problems.jsonl"), "--out", str(tmp_path / "traces.jsonl"),
                   "--set", "engine=vllm", "--set", f"model={tiny_dir}", "--set", "k=2",
                   "--set", "max_tokens=24", "--set", "dtype=float32"])
    assert (report["total"], report["generated"], report["failed"], report["missing"]) == (6, 0, 6, 6)
    assert sum(report["failures"].values()) == 6  # by reason: truncated, no think block, ...
    assert (tmp_path / "traces.jsonl").read_text() == ""
