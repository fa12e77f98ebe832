"""GRPO recipes as Ray jobs: stage the recipe, its data and model, and submit.

`submit_grpo` packs the resolved recipe and its data into a job directory (uploaded as
the job's `working_dir`) and starts either the local GRPO trainer on one node
(`--engine local`: `reason rl train`) or verl's distributed GRPO trainer with the
overrides from rl.verl_config (`--engine verl`, the engine Phi-4-reasoning-plus was
trained with; arXiv 2504.21318, section 4). A local model directory travels with the
job (see `stage_model`). The client calls are reason.ray_jobs'.

Security: Ray 2.60 clusters use token authentication by default; see reason.ray_jobs.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from reason.config import ConfigError, dump_config
from reason.ray_jobs import submit

JOB_DIR = "@JOBDIR@"  # replaced by the job's working directory ($PWD) on the cluster
RECIPE = "recipe.yaml"
SHIP_MODEL_BYTES = 128 * 2**20  # a local model dir up to this size travels with the job (Ray caps one at 512 MiB)


def _copy_path(path: str, name: str, data_dir: Path, key: str) -> str:
    """Copy a file or directory into the job dir; return its path relative to the job dir."""
    src = Path(path)
    if not src.exists():
        raise ConfigError(f"{key}: no such file or directory: {path}")
    dst = data_dir / (name + src.suffix if src.is_file() else name)
    (shutil.copyfile if src.is_file() else shutil.copytree)(src, dst)
    return str(dst.relative_to(data_dir.parent))


def _copy_data(src, name: str, data_dir: Path):
    """A ProblemSource whose file (if it names one) travels in the job dir."""
    if src is None or src.path is None:
        return src
    return src.model_copy(update={"path": _copy_path(src.path, name, data_dir, f"data.{name}")})


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
    return _copy_path(path, "model", data_dir, "model.path")


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
