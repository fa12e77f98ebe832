"""`reason rl ...`: GRPO commands (mounted by reason.cli as `reason rl`).

Cluster scale (rl.jobs, reason.ray_jobs, rl.verl_config, rl.verl_data): `export-verl` writes
verl's Parquet, `submit` runs a recipe as a Ray job (local trainer or verl),
`status`, `logs` and `stop` follow it. Heavy imports happen inside commands.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from reason.console import DEVICE_MEMORY, PLAN, SHAPE, console, memory_plan, user_errors
from reason.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="GRPO: train locally or on a Ray cluster.")

ADDRESS = typer.Option(..., "--address", "-a", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
                       help="Ray dashboard, e.g. http://HEAD:8265")
CONFIG = typer.Option(..., "--config", "-c", help="GRPO recipe YAML")
SET = typer.Option([], "--set", help="override a recipe key: KEY=VALUE")


def _recipe(config: Path, overrides: list[str]):
    from reason.config import load_config
    from rl.config import GRPOConfig

    return load_config(GRPOConfig, config, overrides)


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


# ---------------------------------------------------------------- local training


def grpo_setup(cfg):
    """What the memory plan (reason.memory) needs of a GRPO recipe, on a GPU."""
    from reason.memory import Setup

    r, t, lora = cfg.rollout, cfg.train, cfg.model.lora
    rows = t.micro_batch_tokens or t.micro_batch * (r.max_prompt_tokens + r.max_tokens)
    head = t.micro_batch_tokens - r.max_prompt_tokens if t.micro_batch_tokens else t.micro_batch * r.max_tokens
    return Setup(weight_bytes=4 if cfg.model.dtype == "float32" else 2,
                 compute_bytes=4 if t.autocast == "none" else 2, tokens=rows, head_positions=head,
                 logits_chunk=t.logits_chunk, checkpointing=cfg.model.gradient_checkpointing,
                 lora_r=lora.r if lora else None, lora_targets=lora.target_modules if lora else "all-linear",
                 entropy_grad=cfg.algorithm.entropy_gamma > 0, reference=cfg.algorithm.kl_beta > 0 and not lora,
                 rollout_fraction=r.gpu_memory_utilization if r.engine != "hf" else 0.0)


@app.command("train")
def train_cmd(config: Path = CONFIG, set_: list[str] = SET, plan: bool = PLAN,
              device_memory: Optional[str] = DEVICE_MEMORY, shape: Optional[str] = SHAPE):
    """Run GRPO on this machine (vLLM or HF rollouts); a killed run resumes from its checkpoint."""
    if plan:
        with user_errors():
            cfg = _recipe(config, set_)
        return memory_plan(grpo_setup(cfg), cfg.model.path, device_memory, shape, f"GRPO memory plan: {config}")
    from rl.trainer import train_grpo

    with user_errors():
        result = train_grpo(_recipe(config, set_))
    print(json.dumps({"run_dir": str(result.run_dir), "step": result.step, "total_steps": result.total_steps,
                      "final_dir": str(result.final_dir) if result.final_dir else None}))


# ---------------------------------------------------------------- cluster scale: verl and Ray jobs


@app.command("export-verl")
def export_verl_cmd(config: Path = CONFIG, out: Path = typer.Option(..., "--out", "-o", help="output directory"),
                    set_: list[str] = SET):
    """Write the recipe's problems as verl RLHFDataset Parquet (train/validation.parquet)."""
    from rl.verl_data import export_verl

    with user_errors():
        result = export_verl(_recipe(config, set_), out)
    for split, rows in result.rows.items():
        dropped = result.dropped_no_answer[split]
        note = f" ({dropped} dropped: no ground truth)" if dropped else ""
        console.print(f"{split}: {rows} rows -> {out / (split + '.parquet')}{note}")
    print(json.dumps({"rows": result.rows, "dropped_no_answer": result.dropped_no_answer}))


def _check_with_verl(overrides: list[str]) -> None:
    try:
        import verl  # noqa: F401
    except ImportError:
        console.print("verl is not installed here: the overrides were checked against the recipe, "
                      "not composed with verl's config")
        return
    from rl.verl_config import compose_verl

    try:
        compose_verl(overrides)
    except Exception as e:  # Hydra and verl raise many types; all mean "verl rejects this config"
        raise UserError(f"verl rejects the overrides: {e}") from None
    console.print("verl: config composed and validated")


@app.command("submit")
def submit_cmd(
    address: str = ADDRESS,
    config: Path = CONFIG,
    engine: str = typer.Option("local", help="local: `reason rl train` on one node; verl: verl's GRPO trainer"),
    set_: list[str] = SET,
    env: list[str] = typer.Option([], "--env", "-e", help="environment variable for the job: KEY=VALUE"),
    num_cpus: float = typer.Option(1, help="CPUs reserved for the job's driver"),
    num_gpus: Optional[float] = typer.Option(None, help="GPUs for the driver (default: 1 for a local run on cuda)"),
    name: str = typer.Option("grpo", help="experiment name (verl's trainer.experiment_name)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="stage and print the job and overrides; submit nothing"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to its end; exit 1 unless it SUCCEEDED"),
):
    """Submit a GRPO recipe as a Ray job; prints the job id."""
    from reason import ray_jobs
    from rl.jobs import JOB_DIR, submit_grpo

    with user_errors():
        cfg = _recipe(config, set_)
        job = submit_grpo(address, cfg, engine, _env(env), num_cpus, num_gpus, name, dry_run)
        if dry_run:
            overrides = [o.replace(JOB_DIR, job["job_dir"]) for o in job["overrides"]]
            console.print(f"job directory: {job['job_dir']}\nentrypoint: {job['entrypoint'][:200]}")
            for o in overrides:
                print(o)
            if engine == "verl":
                _check_with_verl(overrides)
            return
        print(job["job_id"])
        if wait:
            ray_jobs.follow_logs(address, job["job_id"], lambda s: print(s, end=""))
            state = ray_jobs.wait(address, job["job_id"])
            console.print(f"job {job['job_id']}: {state}")
            if state != "SUCCEEDED":
                raise typer.Exit(1)


@app.command("status")
def status_cmd(job_id: str, address: str = ADDRESS):
    """Print a job's status (JSON: status, message, entrypoint, times)."""
    from reason.ray_jobs import status

    with user_errors():
        print(json.dumps(status(address, job_id)))


@app.command("logs")
def logs_cmd(job_id: str, address: str = ADDRESS,
             follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends")):
    """Print a job's logs."""
    from reason.ray_jobs import follow_logs, logs

    with user_errors():
        if follow:
            follow_logs(address, job_id, lambda s: print(s, end=""))
        else:
            print(logs(address, job_id), end="")


@app.command("stop")
def stop_cmd(job_id: str, address: str = ADDRESS,
             timeout: float = typer.Option(60, help="seconds to wait for the job to stop")):
    """Stop a running job and wait until it has stopped."""
    from reason.ray_jobs import stop

    with user_errors():
        print(stop(address, job_id, timeout))
