"""The training scaffold SFT, DPO and GRPO share: optimizer, LR schedule, precision, resume.

One `OptimConfig` (AdamW with linear warm-up, then a constant, linear or cosine
schedule; Phi-4-reasoning: lr 1e-5, 450 warm-up steps, weight decay 1e-4, arXiv
2504.21318 section 3; Phi-4-reasoning-plus: lr 5e-8, 10 warm-up steps, section 4),
one `TrainConfig` base with the knobs every trainer has, one precision rule
(`compute_dtype`), one checkpoint state layout and one result type. Each trainer adds
only what is its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from reason.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from reason.config import ConfigError, Section
from reason.errors import UserError
from reason.logprobs import DEFAULT_CHUNK


class OptimConfig(Section):
    lr: float = 1e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0 (Phi-4-mini stage 1: 10%)
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.0  # a decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # on matrices only: biases and norm gains never decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0


class TrainConfig(Section):
    """What every trainer's `train:` section holds; each trainer adds its own knobs."""

    out_dir: str = "runs/train"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Compute precision over the float32 master weights. auto: bf16 where the hardware has
    # bf16 matmuls (a GPU, a CPU with AVX512-BF16 or AMX), else float32.
    autocast: Literal["auto", "none", "bfloat16"] = "auto"
    save_every: int = Field(100, ge=0)  # steps; 0: only when the run ends or stops
    keep_checkpoints: int = Field(2, ge=1)
    stop_after: int | None = None  # end this invocation after this step (checkpointed); resume continues
    resume: bool = True  # continue from the newest checkpoint in out_dir
    # Positions per LM-head call (reason.logprobs.head_logprobs): a step's [tokens, vocab] logits never
    # exist at once, and gradients stay exact. 0: all at once (one LM-head forward fewer, memory grows
    # with tokens x vocab).
    logits_chunk: int = Field(DEFAULT_CHUNK, ge=0)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    total_steps: int
    final_dir: Path | None  # the exported model; None when stopped early (train.stop_after)
    metrics: dict[str, float]  # the last logged step's


# ---------------------------------------------------------------- device and precision

def pick_device(choice: str, index: int = 0) -> torch.device:
    cuda = torch.cuda.is_available() if choice == "auto" else choice == "cuda"
    return torch.device("cuda", index) if cuda else torch.device("cpu")


def keep_freed_blocks(device: torch.device) -> bool:
    """On CPU under glibc, keep freed blocks for reuse instead of returning them to the OS.

    glibc serves every block over 32 MB (a chunk of logits, a [V, H] gradient, a decode
    step's [seqs, V] logits) with a fresh mmap and unmaps it when freed, so each step
    page-faults its temporaries in anew. On 2 cores that was a third of a small model's
    GRPO update (6.5 -> 4.6 s) and a quarter of a bf16 vLLM-CPU eval (44.8 -> 33.5 s),
    for 1-2% more peak RSS. Trainers and the vLLM engine call it; returns whether it
    applied (elsewhere it is a no-op).
    """
    import ctypes
    import platform

    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here. A CPU without AVX512-BF16 or AMX runs them
    5-60x slower than float32, so no setting may pick bf16 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def compute_dtype(setting: str, device: torch.device, key: str = "train.autocast") -> torch.dtype:
    """The one precision rule: "auto" -> bf16 where fast, else float32; "none" -> float32;
    "bfloat16" -> bf16, refused by `key` where bf16 is slow."""
    if setting in ("none", "float32"):
        return torch.float32
    fast = fast_bf16(device)
    if setting == "auto":
        return torch.bfloat16 if fast else torch.float32
    if setting in ("bfloat16", "bf16"):
        if not fast:
            raise ConfigError(f"{key}: bfloat16 on a {device.type} without bf16 matmuls (no AVX512-BF16 or AMX) "
                              "runs 5-60x slower than float32; use auto or float32")
        return torch.bfloat16
    raise ValueError(f"unknown precision setting {setting!r}")


def check_weights_dtype(dtype: str, device: torch.device, key: str = "model.dtype") -> None:
    """Weights stored in bf16 compute in bf16: refused where bf16 matmuls are slow."""
    if dtype == "bfloat16" and not fast_bf16(device):
        raise ConfigError(f"{key}: bfloat16 weights on a {device.type} without bf16 matmuls run 5-60x slower; "
                          "use float32")


def autocast(dtype: torch.dtype, device: torch.device):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark. Linux's VmHWM starts afresh at exec;
    getrusage's ru_maxrss does not (a child started by a 10 GB parent reads 10 GB)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------- optimizer and schedule

def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up, then the schedule.

    >>> [round(lr_factor(s, warmup=2, total=4, schedule="linear"), 2) for s in range(4)]
    [0.5, 1.0, 1.0, 0.5]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases and norm gains do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # One fused kernel for the whole update (several times the foreach path on CPU);
    # FSDP's sharded CPU parameters keep the foreach path.
    fused = all(p.is_cuda for p in params) or not torch.distributed.is_initialized()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total: int):
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=warmup, total=total, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio))


# ---------------------------------------------------------------- checkpoints

def save_state(run_dir: Path, step: int, module, optimizer, scheduler, digest: str, keep: int,
               **position) -> Path:
    """A checkpoint with the one state layout: {"step", "world_size", "data": {"digest", ...position}}.

    `digest` identifies the data plan; `position` is whatever else the trainer needs to
    continue where it stopped (GRPO: the prompt sampler's state).
    """
    return save_checkpoint(run_dir, step, module, optimizer, scheduler,
                           {"data": {"digest": digest, **position}}, keep=keep)


def resume_state(run_dir: Path, cfg: TrainConfig, module, optimizer, scheduler, digest: str
                 ) -> tuple[int, dict]:
    """Restore the newest checkpoint in run_dir: (step, data state); (0, {}) when there is none.

    Refuses (UserError) to resume when train.resume is off, or when the data plan changed,
    since resuming would then skip or replay data.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0, {}
    if not cfg.resume:
        raise UserError(f"train.out_dir: {run_dir} holds checkpoints of an earlier run; "
                        "set train.resume: true or pick a new out_dir")
    state = load_checkpoint(ckpt, module, optimizer, scheduler)
    if state["data"]["digest"] != digest:
        raise UserError(f"{ckpt}: the training data changed since this checkpoint (data, seed or batch "
                        "settings differ), so resuming would skip or replay data")
    return state["step"], state["data"]
