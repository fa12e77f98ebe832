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

from components import require

require("ray.job_submission", "ray[default]==2.60.0, the project's [ray] extra")
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
    return py(head, "from reason.ray_jobs import submit; "
                    f"print(submit({head.address!r}, {entrypoint!r}, {wd!r}, env={{'REASON_JOB': 'yes'}}))")


def wait(head, job_id: str, timeout: float = 240) -> str:
    return py(head, f"from reason.ray_jobs import wait; print(wait({head.address!r}, {job_id!r}, {timeout}))",
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


def reason(*args) -> dict:
    """Run a `reason` command here (the local path); its last stdout line, as JSON."""
    r = subprocess.run([str(BIN / "reason"), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def summary(logs: str) -> dict:
    """A job's summary: its last JSON line (Ray tasks' forwarded log lines may come after it)."""
    return json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])


def fanout(head, *args) -> dict:
    """Run `reason ARGS --shards N` as a job to SUCCEEDED; its summary line, as JSON."""
    job = submit(head, " ".join(["reason", *map(str, args)]))
    assert wait(head, job) == "SUCCEEDED", rl_cli(head, "logs", job).stdout
    return summary(rl_cli(head, "logs", job).stdout)


def write_problems(path: Path, n: int) -> Path:
    from reason.records import write_jsonl
    from reason.synthetic import generate_problems

    write_jsonl(path, generate_problems(n, seed=3))
    return path


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
    job = submit(head, f"reason reward score {src} --out {out} --shards 3")
    assert wait(head, job) == "SUCCEEDED", rl_cli(head, "logs", job).stdout
    assert "reward summary" in rl_cli(head, "logs", job).stdout
    assert [json.loads(x) for x in out.read_text().splitlines()] == local_scores(tmp_path)


def test_generate_fanout_job_matches_the_local_path_and_resumes(head, tmp_path):
    problems = write_problems(tmp_path / "problems.jsonl", 7)
    config = tmp_path / "gen.yaml"
    config.write_text("engine: synthetic\nk: 2\nseed: 5\nmistake_rate: 0.3\n")
    local = tmp_path / "local.jsonl"
    assert reason("distill", "generate", "-p", problems, "-o", local, "-c", config)["generated"] == 14
    out = tmp_path / "fanout.jsonl"
    lines = local.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20])  # a killed run: 3 pairs written, the 4th torn
    first = fanout(head, "distill", "generate", "-p", problems, "--out", out, "--config", config, "--shards", 3)
    assert (first["done_before"], first["generated"], first["failed"], first["missing"]) == (3, 11, 0, 0)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [json.loads(x) for x in lines]
    again = fanout(head, "distill", "generate", "-p", problems, "--out", out, "--config", config, "--shards", 3)
    assert (again["done_before"], again["generated"]) == (14, 0) and out.read_text() == "".join(lines)


def test_select_fanout_job_matches_the_local_path(head, tmp_path):
    """Shards of whole batches, each batch seeded as in one run: the same samples, rates and verdicts."""
    from reason.records import Problem, write_jsonl
    from tiny import save_taught

    prompts = [f"What is {i} + 2?" for i in range(6)]
    model = save_taught(tmp_path / "model", prompts, [f"\\boxed{{{k}}}" for k in range(4, 8)])
    problems = tmp_path / "problems.jsonl"
    write_jsonl(problems, [Problem(id=f"p{i}", prompt=p, ground_truth=None if i % 2 else "4")
                           for i, p in enumerate(prompts)])
    config = tmp_path / "select.yaml"
    config.write_text(f"engine: hf\nmodel: {model}\nn: 4\nmax_tokens: 6\nbatch: 2\nseed: 1\nband: [0.2, 0.6]\n"
                      "chat: {system_prompt: null}\nverify: {workers: 1}\n"
                      f"reference: {{model: {model}, n: 4, min_agreement: 0.25}}\n")
    local = tmp_path / "local-kept.jsonl", tmp_path / "local-dropped.jsonl"
    fanned = tmp_path / "fanout-kept.jsonl", tmp_path / "fanout-dropped.jsonl"
    report = reason("distill", "select", "-p", problems, "-o", local[0], "--dropped", local[1], "-c", config)
    out = fanout(head, "distill", "select", "-p", problems, "--out", fanned[0], "--dropped", fanned[1],
                 "--config", config, "--shards", 3)  # batch 2: shards p0-p1, p2-p3, p4-p5
    assert {k: out[k] for k in report} == report
    read = lambda path: [json.loads(x) for x in path.read_text().splitlines()]  # noqa: E731
    assert read(fanned[0]) == read(local[0]) and read(fanned[1]) == read(local[1])
    measured = read(local[0]) + [d["record"] for d in read(local[1])]
    assert sorted(p["id"] for p in measured) == [f"p{i}" for i in range(6)]
    assert len({p["metadata"].get("pass_rate") for p in measured}) > 1  # the samples vary: a seed mix-up would show
    assert report["kept"] and report["dropped"]


def test_pts_fanout_job_matches_the_local_path_and_resumes(head, tmp_path):
    """Shards of whole batches, each seeded from its position: the pairs of one process, and a resume."""
    from reason.records import Problem, write_jsonl
    from test_pts import BAD, GOOD, QUESTION
    from tiny import save_taught

    model = save_taught(tmp_path / "model", [QUESTION], [GOOD, BAD], steps=200)
    problems = tmp_path / "problems.jsonl"
    write_jsonl(problems, [Problem(id=f"q{i}", prompt=QUESTION, ground_truth="56"[i % 2]) for i in range(6)])
    config = tmp_path / "pts.yaml"
    config.write_text(f"engine: hf\nmodel: {model}\nsamples: 12\nmax_tokens: 48\nbatch: 2\nseed: 2\n"
                      "dtype: float32\nchat: {system_prompt: null}\nverify: {workers: 1}\n")
    local = tmp_path / "local.jsonl"
    report = reason("distill", "pts", "-p", problems, "-o", local, "-c", config)
    assert report["pairs"] > 0
    out, log = tmp_path / "fanout.jsonl", tmp_path / "fanout.log.jsonl"
    lines = (tmp_path / "local.log.jsonl").read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1][:30])  # a killed run: the first batch logged, the second torn
    first = fanout(head, "distill", "pts", "-p", problems, "--out", out, "--config", config, "--shards", 2)
    assert first == {**report, "done_before": 2}
    assert out.read_text() == local.read_text()
    again = fanout(head, "distill", "pts", "-p", problems, "--out", out, "--config", config, "--shards", 2)
    assert again == {**report, "done_before": 6} and out.read_text() == local.read_text()


def test_stop_a_running_job(head):
    job = submit(head, "python -c \"import time; print('sleeping', flush=True); time.sleep(600)\"")
    deadline = time.monotonic() + 120
    while "sleeping" not in rl_cli(head, "logs", job).stdout:
        assert time.monotonic() < deadline, "job never started"
        time.sleep(1)
    r = rl_cli(head, "stop", job)
    assert r.returncode == 0 and r.stdout.strip() == "STOPPED", r.stderr
    assert json.loads(rl_cli(head, "status", job).stdout)["status"] == "STOPPED"


def test_local_engine_job_trains_on_the_cluster(head, tmp_path):
    """`submit --engine local` stages recipe, data and model; `reason rl train` runs there to the end."""
    from tiny import save_tiny

    tiny = save_tiny(tmp_path / "tiny")
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                for i in range(2)))
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {{path: {tiny}}}
data: {{train: {problems}}}
rollout: {{engine: hf, group_size: 2, max_tokens: 4, max_prompt_tokens: 128}}
algorithm: {{kl_beta: 0, entropy_gamma: 0}}
optim: {{lr: 0.01, warmup_steps: 0}}
train: {{steps: 2, prompts_per_step: 2, micro_batch: 8, out_dir: {run}, save_every: 0, log_samples_every: 0,
        autocast: none}}
chat: {{system_prompt: null}}
reward: {{workers: 1}}
""")
    r = rl_cli(head, "submit", "-a", head.address, "-c", recipe, "--engine", "local")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    shutil.rmtree(tiny)  # uploaded with the job: it trains the copy it was given
    assert wait(head, job) == "SUCCEEDED", rl_cli(head, "logs", job).stdout
    status = json.loads(rl_cli(head, "status", job).stdout)
    assert (status["status"], status["entrypoint"]) == ("SUCCEEDED", "reason rl train --config recipe.yaml")
    logs = rl_cli(head, "logs", job).stdout
    assert "step 2/2 reward" in logs, logs
    result = summary(logs)
    assert (result["step"], result["total_steps"], result["run_dir"]) == (2, 2, str(run))
    assert (Path(result["final_dir"]) / "model.safetensors").is_file()


def test_stage_model_ships_a_small_local_model_with_the_job(tmp_path, monkeypatch):
    from rl import jobs

    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 100)
    job, big = tmp_path / "job" / "data", tmp_path / "big" / "data"
    job.mkdir(parents=True)
    big.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert jobs.stage_model("m", job) == "data/model"  # relative to the job's working dir
    assert (job / "model" / "model.safetensors").read_bytes() == b"w" * 100
    for given in ("default", "org/hub-model", "/cluster/only/model"):
        assert jobs.stage_model(given, job) == given
    monkeypatch.setattr(jobs, "SHIP_MODEL_BYTES", 99)  # too big to upload: the node must share the path
    assert jobs.stage_model("m", big) == str(model.resolve()) and not any(big.iterdir())


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
