"""Supervised fine-tuning on teacher traces, and the training loop DPO shares.

The distillation stage of Phi-4-reasoning and stages 1-2 of Phi-4-mini-reasoning
(RECIPES.md sections 1 and 3). Paper knobs: AdamW with linear warm-up then
linear/cosine decay, weight decay and clipping (`optim.*`); global batch in rows
per optimizer step, split into micro-batches and processes (`train.batch_size`,
`train.micro_batch`); sequence length and packing (`data.max_len`,
`data.packing`); RoPE base scaling for a longer context (`model.rope_theta_scale`:
Phi-4-reasoning doubled it for 16K -> 32K); bf16 autocast over fp32 master
weights (`train.autocast`); gradient checkpointing; optional LoRA (needs peft).

The loss is the mean over every assistant token of the global batch (not a mean
of per-micro-batch means), so packing, micro-batching and the number of
processes change nothing but float rounding. One process, or several under
`torchrun` (DDP, or FSDP2 with `train.parallel: fsdp`). Checkpoints every
`train.save_every` steps resume exactly; metrics go to RUN/metrics.jsonl; the
trained model is exported to RUN/final as Hugging Face safetensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from distill.batches import (Batch, DataConfig, Dataset, Item, batch_of, eval_rows, load_datasets, plan_steps, shard,
                             target_count)
from distill.runtime import (Env, all_reduce, autocast, compile_layers, init_distributed, parallelize, peak_memory_gb,
                             sync_grads)
from reason.chat import IGNORE_INDEX, ChatConfig, prepare_tokenizer
from reason.checkpoint import export_model, latest_checkpoint, load_checkpoint, save_checkpoint
from reason.config import Section, dump_config
from reason.console import console, progress
from reason.tracker import Tracker, TrackerConfig


class LoraConfig(Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Section):
    path: str = "default"  # a HF model dir (or hub id), or "default" = the embedded SmolLM2-135M-Instruct
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights and optimizer state; see train.autocast
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    rope_theta_scale: float = 1.0  # Phi-4-reasoning: 2.0 (context 16K -> 32K)
    max_position_embeddings: int | None = None  # raise the advertised context with the scaling
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None


class OptimConfig(Section):
    lr: float = 1e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0 (Phi-4-mini stage 1: 10%)
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # after warm-up
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 1e-4  # not applied to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0


class TrainConfig(Section):
    out_dir: str = "runs/sft"
    epochs: int = 1
    max_steps: int | None = None  # cap on the schedule's length
    stop_after: int | None = None  # end this invocation after this step (checkpointed); resume continues
    batch_size: int = 32  # rows per optimizer step, all processes together
    micro_batch: int = 1  # rows per forward/backward in one process
    autocast: Literal["auto", "none", "bfloat16"] = "auto"  # auto: bf16 where the hardware has bf16 matmuls
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with more than one process (torchrun)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every: int = 500  # steps; 0: only when the run ends or stops
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0: at the start and the end only
    compile: bool = False  # torch.compile the decoder layers (GPU speed; start-up costs ~1 min)
    seed: int = 0
    resume: bool = True  # continue from the newest checkpoint in out_dir


class SFTConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.model.lora is not None and self.train.parallel == "fsdp":
            raise ValueError("model.lora is supported with train.parallel: ddp only")
        return self


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    total_steps: int
    final_dir: Path | None  # the exported model; None when stopped early (train.stop_after)
    metrics: dict[str, float]  # the last logged step's metrics, eval ones included


# ---------------------------------------------------------------- pure maths

def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


# ---------------------------------------------------------------- model

def scale_rope(config, scale: float, max_positions: int | None) -> None:
    """Multiply the RoPE base frequency (rope_theta) in a transformers config."""
    if scale != 1.0:
        params = getattr(config, "rope_parameters", None)
        if params is not None:  # transformers 5
            config.rope_parameters = {**params, "rope_theta": params["rope_theta"] * scale}
        else:
            config.rope_theta *= scale
    if max_positions:
        config.max_position_embeddings = max_positions


def load_model(cfg: ModelConfig, chat: ChatConfig, device: torch.device, trainable: bool = True):
    """The causal LM and its tokenizer, prepared for the chat format; LoRA if asked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from reason.models import load_tokenizer, resolve

    path = resolve(cfg.path)
    config = AutoConfig.from_pretrained(path)
    scale_rope(config, cfg.rope_theta_scale, cfg.max_position_embeddings)
    lm = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, cfg.dtype),
                                              attn_implementation=cfg.attn_implementation)
    tokenizer = prepare_tokenizer(load_tokenizer(path), chat, lm)
    if not trainable:
        return lm.to(device).eval().requires_grad_(False), tokenizer
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        lm = _add_lora(lm, cfg.lora)
    return lm.to(device).train(), tokenizer


def _add_lora(lm, cfg: LoraConfig):
    try:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
    except ImportError:
        raise ValueError("model.lora needs the peft package: pip install peft") from None
    return get_peft_model(lm, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules=cfg.target_modules, task_type="CAUSAL_LM"))


class TokenLogProbs(torch.nn.Module):
    """log p(target) of every target token in a Batch: the forward SFT and DPO share.

    Only positions that have a target go through the LM head, so prompt and
    padding tokens never cost a vocabulary-sized row of logits.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, targets):  # [B, T] each -> [N]
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # [B, T, H]
        keep = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[keep]).float()  # [N, V]
        return -F.cross_entropy(logits, targets[keep], reduction="none")  # [N]


def token_logprobs(module, batch: Batch) -> torch.Tensor:
    return module(batch.input_ids, batch.position_ids, batch.targets)


# ---------------------------------------------------------------- objectives

@dataclass
class Objective:
    """What one trainer optimises. `loss` returns the un-normalised loss sum of a
    micro-batch and metric sums; the loop divides by `count` over the global batch."""

    loss: Callable[[torch.nn.Module, Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count: Callable[[Item], int]
    summarise: Callable[[dict[str, torch.Tensor], list[str]], dict[str, float]]


def sft_loss(module, batch: Batch, n_sources: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    nll = -token_logprobs(module, batch)  # [N]
    src = batch.seq_sources[batch.seq_ids[batch.targets != IGNORE_INDEX]]  # [N] source of each target
    zeros = torch.zeros(n_sources, dtype=torch.float64, device=nll.device)
    sums = {"nll": zeros.index_add(0, src, nll.detach().double()),
            "tokens": zeros.index_add(0, src, torch.ones_like(nll, dtype=torch.float64))}
    return nll.sum(), sums


def sft_summary(sums: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    out = {"loss": (sums["nll"].sum() / sums["tokens"].sum().clamp(min=1)).item()}
    if len(names) > 1:
        for k, name in enumerate(names):
            if sums["tokens"][k] > 0:
                out[f"loss/{name}"] = (sums["nll"][k] / sums["tokens"][k]).item()
    return out


SFT = Objective(sft_loss, target_count, sft_summary)


# ---------------------------------------------------------------- the loop

def _optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # matrices decay; biases and norm gains do not
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # One kernel for the whole update: on a 2-core CPU 0.1 s a step against 0.6 s for
    # foreach on 135M params. FSDP's sharded CPU parameters keep the foreach path.
    fused = all(p.is_cuda for p in params) or not torch.distributed.is_initialized()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def _digest(steps: list) -> str:
    return hashlib.sha1(json.dumps(steps).encode()).hexdigest()[:16]


def _resume(cfg, module, optimizer, scheduler, digest: str, env: Env) -> int:
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    if not cfg.train.resume:
        raise ValueError(f"{run_dir} holds checkpoints of an earlier run; "
                         "set train.resume: true or pick a new out_dir")
    state = load_checkpoint(ckpt, module, optimizer, scheduler)
    if state["data"]["plan_digest"] != digest:
        raise ValueError(f"{ckpt}: the data plan changed since this checkpoint (data, seed, batch or "
                         "epochs differ), so resuming would skip or replay data")
    if env.rank == 0:
        console.print(f"resumed from {ckpt} (step {state['step']})")
    return state["step"]


def evaluate(module, ds: Dataset, cfg, objective: Objective, env: Env) -> dict[str, float]:
    """Objective over the whole eval set; every rank runs the same number of forwards."""
    rows = eval_rows(ds, cfg.data)
    lengths = ds.lengths()
    per_rank = [shard(rows, lengths, r, env.world, cfg.train.micro_batch) for r in range(env.world)]
    mine, n = per_rank[env.rank], max(len(p) for p in per_rank)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad(), autocast(cfg, env):
        for i in range(n):  # a rank out of rows re-runs rank 0's first micro-batch and drops it (FSDP needs all)
            batch = batch_of(ds, mine[i] if i < len(mine) else per_rank[0][0]).to(env.device)
            _, part = objective.loss(module, batch, len(ds.names))
            if i < len(mine):
                sums = {name: sums.get(name, 0) + v for name, v in part.items()}
    return {f"eval/{k}": v for k, v in objective.summarise(all_reduce(sums), ds.names).items()}


def fit(cfg, lm, tokenizer, train_ds: Dataset, eval_ds: Dataset, objective: Objective, env: Env) -> TrainResult:
    """Train `lm` on `train_ds` for `cfg.train` (an SFTConfig or DPOConfig)."""
    t = cfg.train
    if t.batch_size % (t.micro_batch * env.world):
        raise ValueError(f"train.batch_size {t.batch_size} must be a multiple of train.micro_batch "
                         f"{t.micro_batch} x {env.world} processes")
    run_dir = Path(t.out_dir)
    if t.compile:
        compile_layers(lm)
    module = parallelize(TokenLogProbs(lm), t.parallel, env)
    optimizer = _optimizer(module, cfg.optim)
    steps = plan_steps(train_ds, cfg.data, t.epochs, t.batch_size)
    total = min(len(steps), t.max_steps or len(steps))
    if total == 0:
        raise ValueError(f"{len(train_ds.items)} training items make no full step of {t.batch_size} rows")
    warmup = cfg.optim.warmup_steps or round(cfg.optim.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=warmup, total=total, schedule=cfg.optim.schedule, min_ratio=cfg.optim.min_lr_ratio))
    digest = _digest(steps[:total])
    start = _resume(cfg, module, optimizer, scheduler, digest, env)
    if env.rank == 0:
        dump_config(cfg, run_dir / "config.yaml")
    tracker = Tracker(run_dir, cfg.tracker, cfg.model_dump(mode="json"), resume_step=start, enabled=env.rank == 0)
    lengths = train_ds.lengths()
    counts = [objective.count(item) for item in train_ds.items]  # loss normaliser per item
    metrics: dict[str, float] = {}
    if start == 0 and eval_ds.items:
        metrics = evaluate(module, eval_ds, cfg, objective, env)
        tracker.log(0, metrics)
    end = min(total, t.stop_after or total)
    bar = progress() if env.rank == 0 else None
    with bar or nullcontext():
        task = bar.add_task("train", total=total, completed=start) if bar else None
        for step in range(start, end):
            metrics = _train_step(module, optimizer, scheduler, train_ds, steps[step], lengths, counts, cfg,
                                  objective, env)
            done = step + 1
            if eval_ds.items and (done == total or (t.eval_every and done % t.eval_every == 0)):
                metrics.update(evaluate(module, eval_ds, cfg, objective, env))
            tracker.log(done, metrics)
            if done == end or (t.save_every and done % t.save_every == 0):
                save_checkpoint(run_dir, done, module, optimizer, scheduler,
                                {"data": {"next_step": done, "plan_digest": digest}}, keep=t.keep_checkpoints)
            if bar:
                bar.update(task, completed=done, description=(
                    f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tok/s"))
    tracker.close()
    final = export_model(lm, tokenizer, run_dir / "final") if end == total else None
    return TrainResult(run_dir, end, total, final, metrics)


def _train_step(module, optimizer, scheduler, ds: Dataset, rows, lengths, counts, cfg, objective: Objective,
                env: Env) -> dict[str, float]:
    t0 = time.perf_counter()
    norm = sum(counts[i] for row in rows for i in row)  # over the global batch, every process alike
    micro = shard(rows, lengths, env.rank, env.world, cfg.train.micro_batch)
    sums: dict[str, torch.Tensor] = {}
    optimizer.zero_grad(set_to_none=True)
    for k, mb in enumerate(micro):
        batch = batch_of(ds, mb).to(env.device)
        with sync_grads(module, k == len(micro) - 1):
            with autocast(cfg, env):
                loss, part = objective.loss(module, batch, len(ds.names))
            # DDP and FSDP average gradients over processes; the sum over the global batch wants them added.
            (loss * env.world / max(norm, 1)).backward()
        sums = {name: sums.get(name, 0) + v for name, v in part.items()}
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    out = objective.summarise(all_reduce(sums), ds.names)
    tokens = sum(lengths[i] for row in rows for i in row)
    seconds = time.perf_counter() - t0
    return {**out, "lr": lr, "grad_norm": grad_norm.item(), "tokens": tokens, "tokens_per_s": tokens / seconds,
            "step_seconds": seconds, "peak_mem_gb": peak_memory_gb(env.device)}


def describe_data(train_ds: Dataset, eval_ds: Dataset, env: Env) -> None:
    """Say what the run trains on, and what was dropped and why (RECIPES.md section 4)."""
    if env.rank != 0:
        return
    counts = {n: train_ds.sources.count(k) for k, n in enumerate(train_ds.names)}
    console.print(f"data: {len(train_ds.items)} train items {counts}, {len(eval_ds.items)} eval items")
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        for why, n in ds.dropped.items():
            console.print(f"[yellow]data: dropped {n} {name} items: {why}[/]")


def train_sft(cfg: SFTConfig) -> TrainResult:
    """Run SFT as configured; under torchrun every process calls this."""
    env = init_distributed(cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)
        lm, tokenizer = load_model(cfg.model, cfg.chat, env.device)
        train_ds, eval_ds = load_datasets(cfg.data, tokenizer, cfg.chat, "sft")
        describe_data(train_ds, eval_ds, env)
        return fit(cfg, lm, tokenizer, train_ds, eval_ds, SFT, env)
    finally:
        env.close()
