"""Ray jobs against a real Ray 2.60 head on 127.0.0.1 (token auth on, as Ray ships it).

One head per module, started with `ray start --head --block` in its own process
group and a private temp dir and HOME, and stopped by killing exactly the
processes it started. Every client call runs in a subprocess, as a user's would,
so each one's RAY_AUTH_MODE / token is its own.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission", reason="needs ray[default]==2.60.0 (the project's [ray] extra)")
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
GOOD = "<think>\nadd\n</think>\n\n\\boxed{4}"
SAMPLES = [
    {"id": f"s{i}", "completion": GOOD if i % 3 else GOOD.replace("{4}", "{5}"), "ground_truth": "4",
     "num_tokens": 10 + i, "finish_reason": "length" if i == 4 else "stop", "source": f"src{i % 2}"}
    for i in range(7)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    def __init__(self, tmp: Path):
        self.home, self.temp = tmp / "home", Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths
        self.home.mkdir()
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {**base, "HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
        self.log = open(tmp / "ray-head.log", "w")
        # As on a real cluster: a token first (~/.ray/auth_token), then a head that requires it.
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env, check=True,
                       stdout=self.log, stderr=subprocess.STDOUT, timeout=120)
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", f"--port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             "--num-cpus=2", f"--temp-dir={self.temp}", "--disable-usage-stats"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        token_file = self.home / ".ray" / "auth_token"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "ray start exited; see ray-head.log"
            if token_file.is_file() and self._answers():
                self.token = token_file.read_text().strip()
                return
            time.sleep(1)
        raise TimeoutError(f"Ray head not ready after {timeout} s")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
            return True
        except OSError as e:
            return getattr(e, "code", None) in (401, 403)  # up, and asking for the token

    def client_env(self, **extra) -> dict:
        return {**self.env, "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.address, **extra}

    def stop(self) -> None:
        """Kill the head's process group, then any straggler still using its temp dir, by pid."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in self._pids_using_temp():
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)

    def _pids_using_temp(self) -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and str(self.temp).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                continue
        return pids


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = Head(tmp_path_factory.mktemp("ray"))
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()
    assert not h._pids_using_temp(), "Ray processes survived the head's shutdown"


def rl_cli(head, *args, env=None, timeout=300):
    r = subprocess.run([sys.executable, "-c", "from rl.cli import app; app()", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env or head.client_env())
    r.stderr = " ".join(r.stderr.split())  # the console wraps long error lines
    return r


def py(head, code: str, timeout=300) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env=head.client_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def submit(head, entrypoint: str, working_dir=None) -> str:
    wd = str(working_dir) if working_dir else None
    return py(head, "from rl.ray_jobs import submit; "
                    f"print(submit({head.address!r}, {entrypoint!r}, {wd!r}, env={{'REASON_JOB': 'yes'}}))")


def wait(head, job_id: str, timeout: float = 240) -> str:
    return py(head, f"from rl.ray_jobs import wait; print(wait({head.address!r}, {job_id!r}, {timeout}))",
              timeout=timeout + 60)


def write_samples(path: Path) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return path


def local_scores(tmp_path) -> list[dict]:
    out = tmp_path / "local.jsonl"
    r = subprocess.run([str(BIN / "reason"), "reward", "score", write_samples(tmp_path / "local-in.jsonl"),
                        "--out", out, "--set", "workers=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_reason_cli_job_runs_in_the_uploaded_working_dir(head, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_samples(job_dir / "samples.jsonl")
    out = tmp_path / "scores.jsonl"
    job = submit(head, f"test \"$REASON_JOB\" = yes && reason reward score samples.jsonl --out {out} "
                       "--set workers=1", job_dir)
    assert wait(head, job) == "SUCCEEDED", rl_cli(head, "logs", job).stdout
    status = json.loads(rl_cli(head, "status", job).stdout)
    assert status["status"] == "SUCCEEDED" and "reason reward score" in status["entrypoint"]
    logs = rl_cli(head, "logs", job)
    assert logs.returncode == 0 and "reward summary" in logs.stdout
    assert [json.loads(x) for x in out.read_text().splitlines()] == local_scores(tmp_path)


def test_reward_fanout_job_matches_the_local_path(head, tmp_path):
    src, out = write_samples(tmp_path / "in.jsonl"), tmp_path / "fanout.jsonl"
    job = submit(head, f"python -m rl.ray_jobs score {src} --out {out} --shards 3")
    assert wait(head, job) == "SUCCEEDED", rl_cli(head, "logs", job).stdout
    assert json.loads(rl_cli(head, "logs", job).stdout.strip().splitlines()[-1]) == {
        "scored": 7, "shards": 3, "out": str(out)}
    assert [json.loads(x) for x in out.read_text().splitlines()] == local_scores(tmp_path)


def test_stop_a_running_job(head):
    job = submit(head, "python -c \"import time; print('sleeping', flush=True); time.sleep(600)\"")
    deadline = time.monotonic() + 120
    while "sleeping" not in rl_cli(head, "logs", job).stdout:
        assert time.monotonic() < deadline, "job never started"
        time.sleep(1)
    r = rl_cli(head, "stop", job)
    assert r.returncode == 0 and r.stdout.strip() == "STOPPED", r.stderr
    assert json.loads(rl_cli(head, "status", job).stdout)["status"] == "STOPPED"


def test_local_engine_submission_reaches_the_cluster(head, tmp_path):
    """`submit --engine local` stages recipe + data and submits `reason rl train --config recipe.yaml`."""
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "problem": "1 + 1?", "answer": "2"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{train: {problems}}}\ntrain: {{steps: 1}}\n")
    r = rl_cli(head, "submit", "-a", head.address, "-c", recipe, "--engine", "local")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert json.loads(rl_cli(head, "status", job).stdout)["entrypoint"] == "reason rl train --config recipe.yaml"
    rl_cli(head, "stop", job)  # the local trainer itself is tested elsewhere; here only the submission


def test_missing_or_wrong_token_is_refused(head):
    no_token = {k: v for k, v in head.client_env().items() if not k.startswith("RAY_")}
    r = rl_cli(head, "status", "nope", "-a", head.address, env=no_token)
    assert r.returncode == 2 and "token authentication" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr
    r = rl_cli(head, "status", "nope", "-a", head.address, env=head.client_env(RAY_AUTH_TOKEN="0" * 32))
    assert r.returncode == 2 and "refused" in r.stderr, r.stderr


def test_unknown_job_and_unreachable_address(head):
    r = rl_cli(head, "status", "raysubmit_nope", "-a", head.address)
    assert r.returncode == 2 and "raysubmit_nope" in r.stderr and "Traceback" not in r.stderr
    r = rl_cli(head, "logs", "x", "-a", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach Ray" in r.stderr
