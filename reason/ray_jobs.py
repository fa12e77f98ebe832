"""The Ray Job Submission client every stage uses: submit, status, logs, wait, stop.

A team with a Ray cluster submits the same recipe it runs locally: GRPO recipes are
staged as jobs by rl.jobs; the data stages fan out over a cluster from inside a job
(reason.fanout, distill.fanout).

Security: Ray 2.60 clusters use token authentication by default. A client must
run with RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN, or the file
~/.ray/auth_token that `ray start` wrote); without it the cluster refuses the
request and this module says so. Do not turn authentication off on the cluster.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from reason.errors import UserError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class RayJobError(UserError):
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
