"""Run `reason` work on a Ray cluster through the Ray Job Submission API.

DESIGN.md "Who uses it": a team with a Ray cluster submits the same recipe YAML
it runs locally. `submit_grpo` packs the resolved recipe and its data into a job
directory (uploaded as the job's `working_dir`) and starts either the local GRPO
trainer on one node (`--engine local`: `reason rl train`) or verl's distributed
GRPO trainer with the overrides from rl.verl_config (`--engine verl`, the engine
Phi-4-reasoning-plus was trained with). `status`, `logs`, `wait` and `stop`
follow a job. A local model directory travels with the job (see `stage_model`).
The data stages' fan-outs (reward scoring, teacher traces, teachable prompts), run
as jobs through `submit`, are in rl.ray_fanout.

Security: Ray 2.60 clusters use token authentication by default. A client must
run with RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN, or the file
~/.ray/auth_token that `ray start` wrote); without it the cluster refuses the
request and this module says so. Do not turn authentication off on the cluster.
"""
from __future__ import annotations

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
SHIP_MODEL_BYTES = 128 * 2**20  # a local model dir up to this size travels with the job (Ray caps one at 512 MiB)


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


def stage_model(path: str, data_dir: Path) -> str:
    """model.path as the job on the cluster must see it.

    A local model directory up to SHIP_MODEL_BYTES is copied into the job dir (a relative
    path, valid on whichever node runs the job); a bigger one becomes an absolute path, which
    that node must see at the same place (shared storage). "default" (the embedded model),
    hub ids and paths that exist only on the cluster are left as given.
    """
    src = Path(path)
    if path == "default" or not src.is_dir():
        return path
    if sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) > SHIP_MODEL_BYTES:
        return str(src.resolve())
    return _copy_data(path, "model", data_dir)


def stage_local(cfg, job_dir: Path) -> str:
    """Job dir for `--engine local`: the recipe (data and model paths made relative), its data and model."""
    if not Path(cfg.train.out_dir).is_absolute():
        # Ray names an uploaded job dir by its content hash: two submissions of one recipe would
        # share (and resume) one run, and Ray may delete it with the job dir.
        raise ConfigError(f"train.out_dir: {cfg.train.out_dir!r} is relative; a cluster job needs an "
                          "absolute path on storage the node keeps (e.g. --set train.out_dir=/shared/runs/grpo)")
    cfg = cfg.model_copy(deep=True)
    data_dir = job_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg.data.train = _copy_data(cfg.data.train, "train", data_dir)
    cfg.data.validation = _copy_data(cfg.data.validation, "validation", data_dir)
    cfg.model.path = stage_model(cfg.model.path, data_dir)
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
    try:
        if engine == "local":
            entrypoint = stage_local(cfg, job_dir)
            gpus = (1 if cfg.train.device == "cuda" else 0) if num_gpus is None else num_gpus
        else:
            entrypoint, overrides = stage_verl(cfg, job_dir, experiment)
            gpus = num_gpus or 0
    except BaseException:
        shutil.rmtree(job_dir)
        raise
    out = {"job_id": None, "entrypoint": entrypoint, "job_dir": str(job_dir), "overrides": overrides}
    if not dry_run:
        try:
            out["job_id"] = submit(address, entrypoint, job_dir, env, num_cpus, gpus)
        finally:
            shutil.rmtree(job_dir)  # uploaded by submit; a dry run keeps it for inspection
    return out
