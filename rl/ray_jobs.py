"""Run `reason` work on a Ray cluster through the Ray Job Submission API.

DESIGN.md "Who uses it": a team with a Ray cluster submits the same recipe YAML
it runs locally. `submit_grpo` packs the resolved recipe and its data into a job
directory (uploaded as the job's `working_dir`) and starts either the local GRPO
trainer on one node (`--engine local`: `reason rl train`) or verl's distributed
GRPO trainer with the overrides from rl.verl_config (`--engine verl`, the engine
Phi-4-reasoning-plus was trained with). `status`, `logs`, `wait` and `stop`
follow a job. `score_fanout` is the data-stage fan-out: one Ray task scores one
JSONL shard with rewards.score.score_samples, and the rows come back in input
order, identical to a local `reason reward score`.

Security: Ray 2.60 clusters use token authentication by default. A client must
run with RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN, or the file
~/.ray/auth_token that `ray start` wrote); without it the cluster refuses the
request and this module says so. Do not turn authentication off on the cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from reason.config import ConfigError, dump_config

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_DIR = "@JOBDIR@"  # replaced by the job's working directory ($PWD) on the cluster
RECIPE = "recipe.yaml"
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class RayJobError(RuntimeError):
    """The cluster could not be reached, refused us, or does not know the job."""


def client(address: str):
    """A JobSubmissionClient for http://HEAD:8265, with errors a user can act on."""
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise RayJobError("the Ray Jobs SDK is missing: pip install 'ray[default]==2.60.0' "
                          "(or this project's [ray] extra)") from None
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; here the explicit one wins.
    saved = {k: os.environ.pop(k) for k in ADDRESS_VARS if k in os.environ}
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise RayJobError(f"Ray at {address} refused the request: {_auth_hint(e)}") from None
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RayJobError(f"cannot reach Ray at {address}: {e}") from None
    finally:
        os.environ.update(saved)


def _auth_hint(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{first} The cluster uses token authentication: run with RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN set to the head's token (or its ~/.ray/auth_token copied to this machine).")


def _call(address: str, fn_name: str, *args, **kwargs):
    """Call a JobSubmissionClient method, turning SDK errors into RayJobError."""
    from ray.exceptions import AuthenticationError

    method = getattr(client(address), fn_name)
    try:
        return method(*args, **kwargs)
    except AuthenticationError as e:
        raise RayJobError(f"Ray at {address} refused the request: {_auth_hint(e)}") from None
    except RuntimeError as e:  # the SDK's "Request failed with status code 404: ..." and kin
        raise RayJobError(f"{fn_name.replace('_', ' ')}: {e}") from None


def submit(address: str, entrypoint: str, working_dir: str | Path | None = None, env: dict | None = None,
           num_cpus: float = 1, num_gpus: float = 0, submission_id: str | None = None) -> str:
    """Submit an entrypoint with a runtime env (working dir uploaded, env vars); return the job id."""
    runtime_env = {"env_vars": dict(env or {})}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    return _call(address, "submit_job", entrypoint=entrypoint, runtime_env=runtime_env,
                 submission_id=submission_id, entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus)


def status(address: str, job_id: str) -> dict:
    """The job's status, message, entrypoint and times, as plain data."""
    info = _call(address, "get_job_info", job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def logs(address: str, job_id: str) -> str:
    return _call(address, "get_job_logs", job_id)


def follow_logs(address: str, job_id: str, write=print) -> None:
    """Stream the job's logs as they are written, until the job ends."""
    import asyncio

    async def run() -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            write(chunk)

    asyncio.run(run())


def wait(address: str, job_id: str, timeout: float = 600, poll: float = 1.0) -> str:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED; return that status."""
    deadline = time.monotonic() + timeout
    while True:
        state = status(address, job_id)["status"]
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise RayJobError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll)


def stop(address: str, job_id: str, timeout: float = 60) -> str:
    """Ask the job to stop and wait until it has; return its final status."""
    _call(address, "stop_job", job_id)
    return wait(address, job_id, timeout)


# ---------------------------------------------------------------- GRPO recipes as jobs


def _copy_data(spec: str | None, name: str, data_dir: Path) -> str | None:
    """Copy a problems file or dataset directory into the job dir; return its relative path."""
    if spec is None or spec == "synthetic":
        return spec
    src = Path(spec)
    if not src.exists():
        raise ConfigError(f"data.{name}: no such file or directory: {spec}")
    dst = data_dir / (name + src.suffix if src.is_file() else name)
    (shutil.copyfile if src.is_file() else shutil.copytree)(src, dst)
    return str(dst.relative_to(data_dir.parent))


def stage_local(cfg, job_dir: Path) -> str:
    """Job dir for `--engine local`: the recipe (data paths made relative) and its data files."""
    cfg = cfg.model_copy(deep=True)
    data_dir = job_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg.data.train = _copy_data(cfg.data.train, "train", data_dir)
    cfg.data.validation = _copy_data(cfg.data.validation, "validation", data_dir)
    dump_config(cfg, job_dir / RECIPE)
    return f"reason rl train --config {RECIPE}"


def stage_verl(cfg, job_dir: Path, experiment: str) -> tuple[str, list[str]]:
    """Job dir for `--engine verl`: the exported Parquet; returns (entrypoint, overrides)."""
    from rl.verl_config import ENTRYPOINT, verl_overrides
    from rl.verl_data import export_verl

    export = export_verl(cfg, job_dir / "data")
    dump_config(cfg, job_dir / RECIPE)  # kept beside the run for reproducibility
    val = f"{JOB_DIR}/data/validation.parquet" if export.validation else None
    overrides = verl_overrides(cfg, f"{JOB_DIR}/data/train.parquet", val, experiment)
    return ENTRYPOINT + " " + " ".join(_shell_arg(o) for o in overrides), overrides


def _shell_arg(arg: str) -> str:
    """Single-quote for the job's shell, with JOB_DIR left outside the quotes as "$PWD"."""
    quoted = "'" + arg.replace("'", "'\"'\"'") + "'"
    return quoted.replace(JOB_DIR, "'\"$PWD\"'")


def submit_grpo(address: str, cfg, engine: str = "local", env: dict | None = None, num_cpus: float = 1,
                num_gpus: float | None = None, experiment: str = "grpo", dry_run: bool = False) -> dict:
    """Stage and submit a GRPO recipe; return {job_id, entrypoint, job_dir, overrides}.

    `num_gpus` defaults to 1 for a local-engine run whose train.device is cuda, else 0;
    a verl driver needs no GPU itself (verl's workers reserve theirs). With dry_run
    nothing is submitted, job_id is None and job_dir is kept; otherwise job_dir is
    removed once Ray has uploaded it.
    """
    if engine not in ("local", "verl"):
        raise ConfigError(f"--engine must be local or verl, got {engine!r}")
    job_dir = Path(tempfile.mkdtemp(prefix="reason-job-"))
    overrides: list[str] = []
    if engine == "local":
        entrypoint = stage_local(cfg, job_dir)
        gpus = (1 if cfg.train.device == "cuda" else 0) if num_gpus is None else num_gpus
    else:
        entrypoint, overrides = stage_verl(cfg, job_dir, experiment)
        gpus = num_gpus or 0
    out = {"job_id": None, "entrypoint": entrypoint, "job_dir": str(job_dir), "overrides": overrides}
    if not dry_run:
        try:
            out["job_id"] = submit(address, entrypoint, job_dir, env, num_cpus, gpus)
        finally:
            shutil.rmtree(job_dir)  # uploaded by submit; a dry run keeps it for inspection
    return out


# ---------------------------------------------------------------- fan-out: rewards


def _score_shard(lines: list[str], terms: list[dict], workers: int | None, timeout: float) -> list[dict]:
    """One Ray task: validate and score one shard exactly as `reason reward score` does."""
    from rewards.registry import RewardTerm
    from rewards.score import ScoreSample, score_samples

    samples = [ScoreSample.model_validate_json(line) for line in lines]
    rows, _ = score_samples(samples, [RewardTerm(**t) for t in terms], workers, timeout)
    return rows


def score_fanout(in_path: str | Path, out_path: str | Path, terms: list[dict], shards: int,
                 workers: int | None = 1, timeout: float = 10.0) -> int:
    """Score a JSONL file as `shards` Ray tasks (inside a Ray driver); write rows in input order.

    Each row's `index` is its line's position in the whole file, as in the local path.
    """
    import ray

    from reason.records import RecordError, write_jsonl

    lines = [ln for ln in Path(in_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise RecordError(in_path, 0, "no samples")
    size = -(-len(lines) // max(1, shards))  # ceil: every shard but the last is full
    task = ray.remote(num_cpus=1)(_score_shard)
    starts = range(0, len(lines), size)
    refs = [task.remote(lines[i:i + size], terms, workers, timeout) for i in starts]
    rows = []
    for start, shard_rows in zip(starts, ray.get(refs), strict=True):
        rows += [{**r, "index": start + r["index"]} for r in shard_rows]
    return write_jsonl(out_path, rows)


def _main(argv: list[str] | None = None) -> None:
    """`python -m rl.ray_jobs score IN --out OUT --shards N [--reward NAME]`: the fan-out job's driver."""
    import argparse

    import ray

    p = argparse.ArgumentParser(prog="python -m rl.ray_jobs")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score a JSONL file as Ray tasks, one per shard")
    s.add_argument("input")
    s.add_argument("--out", required=True)
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--reward", action="append", default=[], help="reward name; repeatable; default phi4_plus")
    s.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    terms = [{"name": n} for n in a.reward or ["phi4_plus"]]
    ray.init(address="auto")
    n = score_fanout(a.input, a.out, terms, a.shards, timeout=a.timeout)
    print(json.dumps({"scored": n, "shards": a.shards, "out": a.out}))


if __name__ == "__main__":
    _main()
