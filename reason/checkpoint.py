"""Training checkpoints that a killed run resumes from exactly, and the final export.

Shared by the SFT, DPO and GRPO trainers, so that resume is exact. A
checkpoint holds the full model and optimizer state, the LR scheduler, every
rank's RNG states and the trainer's own state (step, data position); it is written
into a temporary directory and renamed into place, so a run killed at any moment
leaves either the whole checkpoint or none. Works for a plain module, DDP and FSDP2
alike: state is gathered to full tensors through torch.distributed.checkpoint.

Layout: RUN/checkpoints/step-000100/{model.pt, optimizer.pt, scheduler.pt,
rng-rank0.pt, ..., state.json}. `export_model` writes a plain Hugging Face
safetensors directory that transformers and vLLM load (no quantization_config).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
PREFIX = "step-"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


@contextlib.contextmanager
def _writing(tmp: Path, final: Path):
    """On a failed write, drop the half-written `tmp` and say where and how much space is
    left: a full disk otherwise surfaces as torch's bare "basic_ios::clear: iostream error"."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if _rank() == 0:  # rank 0 owns `tmp`; another rank's failure must not delete its files mid-write
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free / 2**20
        raise OSError(f"could not write {final} ({free:.0f} MiB free on its disk; "
                      f"what was saved before it is intact): {e}") from e


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int | None = 2) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` (None: all).

    Every rank must call it (gathering sharded state is collective); rank 0
    writes the shared files, each rank its own RNG state. Returns the directory.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    _barrier()
    with _writing(tmp, final):
        torch.save(rng_state(), tmp / f"rng-rank{_rank()}.pt")
        if _rank() == 0:
            torch.save(model_sd, tmp / "model.pt")
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": _world(), **state}, indent=1))
    _barrier()
    if _rank() == 0:
        for f in tmp.iterdir():  # durable before it becomes visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving a step: move the old one aside, never half-replace it
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)  # and the rename itself
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep is not None:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (state.json)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != _world():
        raise ValueError(f"{path}: saved with {state['world_size']} processes, resuming with {_world()}; "
                         "the data order per rank would differ")
    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / f"rng-rank{_rank()}.pt", weights_only=False))
    return state


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Save a Hugging Face safetensors model + tokenizer, atomically (collective).

    `model` is the transformers model itself (possibly sharded by FSDP2), or a peft
    model, whose adapters are merged into the exported weights and left in the model.
    """
    from reason.models import is_peft, merged_state_dict

    out = Path(out_dir)
    peft = is_peft(model)  # peft models are never sharded (the trainers refuse)
    # Adapters folded in without unloading them: GRPO exports its initial policy and trains on.
    full = merged_state_dict(model) if peft else get_model_state_dict(model, options=FULL)  # collective under FSDP2
    if _rank() == 0:
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        hf = model.get_base_model() if peft else model
        with _writing(tmp, out):
            hf.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            _plain_config(tmp / "config.json")
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    _barrier()
    return out


def _plain_config(path: Path) -> None:
    # A GGUF-converted or quantized source leaves quantization_config behind; vLLM would then try to quantize.
    cfg = json.loads(path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(cfg, indent=2))
