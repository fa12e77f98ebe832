"""Supervised fine-tuning on teacher traces, and the training loop DPO shares.

The distillation stage of Phi-4-reasoning and stages 1-2 of Phi-4-mini-reasoning
(arXiv 2504.21318, 2504.21233; docs/recipes.md §1, §3). Paper knobs: AdamW with linear warm-up then
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
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from distill.batches import (Batch, DataConfig, Dataset, Item, batch_of, item_rows, load_datasets, plan_steps, shard,
                             target_count)
from distill.runtime import Env, all_reduce, compile_layers, init_distributed, parallelize, sync_grads
from reason.chat import IGNORE_INDEX, ChatConfig
from reason.checkpoint import export_model
from reason.config import Section, dump_config
from reason.console import console, progress
from reason.errors import UserError
from reason.logprobs import TokenLogProbs
from reason.models import ModelConfig, load_model
from reason.tracker import Tracker, TrackerConfig
from reason.train import (OptimConfig, TrainConfig, TrainResult, autocast, build_optimizer, build_scheduler,
                          peak_memory_gb, resume_state, save_state)


class SFTTrainConfig(TrainConfig):
    out_dir: str = "runs/sft"
    epochs: int = 1
    max_steps: int | None = None  # cap on the schedule's length
    batch_size: int = 32  # rows per optimizer step, all processes together
    micro_batch: int = 1  # rows per forward/backward in one process
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with more than one process (torchrun)
    eval_every: int = 0  # steps; 0: at the start and the end only
    compile: bool = False  # torch.compile the decoder layers (GPU speed, at a compile cost on start-up)


class SFTConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: SFTTrainConfig = Field(default_factory=SFTTrainConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.model.lora is not None and self.train.parallel == "fsdp":
            raise ValueError("model.lora is supported with train.parallel: ddp only")
        return self


def sft_setup(cfg: SFTConfig, gpus: int = 1):
    """What the memory plan (reason.memory) needs of an SFT recipe on one of `gpus` GPUs: a micro-batch
    of full rows, every position counted as a target (an upper bound)."""
    from reason.memory import Setup

    tokens, lora = cfg.train.micro_batch * cfg.data.max_len, cfg.model.lora
    return Setup(weight_bytes=4 if cfg.model.dtype == "float32" else 2,
                 compute_bytes=4 if cfg.train.autocast == "none" else 2, tokens=tokens, head_positions=tokens,
                 logits_chunk=cfg.train.logits_chunk, checkpointing=cfg.model.gradient_checkpointing,
                 lora_r=lora.r if lora else None, lora_targets=lora.target_modules if lora else "all-linear",
                 shards=gpus if cfg.train.parallel == "fsdp" else 1)


# ---------------------------------------------------------------- the forward

def target_logprobs(module, batch: Batch) -> torch.Tensor:
    """log p of every target token of a Batch, in order: [N]."""
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
    nll = -target_logprobs(module, batch)  # [N]
    src = batch.seq_sources[batch.seq_ids[batch.targets != IGNORE_INDEX]]  # [N] source of each target
    zeros = torch.zeros(n_sources, dtype=torch.float64, device=nll.device)
    sums = {"nll": zeros.index_add(0, src, nll.detach().double()),
            "tokens": zeros.index_add(0, src, torch.ones_like(nll, dtype=torch.float64))}
    return nll.sum(), sums


def sft_summary(sums: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    per_source = {f"loss/{name}": (sums["nll"][k] / sums["tokens"][k]).item()
                  for k, name in enumerate(names) if len(names) > 1 and sums["tokens"][k] > 0}
    return {"loss": (sums["nll"].sum() / sums["tokens"].sum().clamp(min=1)).item(), **per_source}


SFT = Objective(sft_loss, target_count, sft_summary)


# ---------------------------------------------------------------- the loop

def eval_loss(module, ds: Dataset, cfg, objective: Objective, env: Env) -> dict[str, float]:
    """Objective over the whole eval set; every rank runs the same number of forwards."""
    rows = item_rows(ds, cfg.data, list(range(len(ds.items))))
    lengths = ds.lengths()
    per_rank = [shard(rows, lengths, r, env.world, cfg.train.micro_batch) for r in range(env.world)]
    mine, n = per_rank[env.rank], max(len(p) for p in per_rank)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad(), autocast(env.dtype, env.device):
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
        raise UserError(f"train.batch_size {t.batch_size} must be a multiple of train.micro_batch "
                        f"{t.micro_batch} x {env.world} processes")
    run_dir = Path(t.out_dir)
    if t.compile:
        compile_layers(lm)
    module = parallelize(TokenLogProbs(lm, chunk=t.logits_chunk), t.parallel, env)
    optimizer = build_optimizer(module, cfg.optim)
    steps = plan_steps(train_ds, cfg.data, t.epochs, t.batch_size)
    total = min(len(steps), t.max_steps or len(steps))
    if total == 0:
        raise UserError(f"{len(train_ds.items)} training items make no full step of train.batch_size "
                        f"{t.batch_size} rows")
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    digest = hashlib.sha1(json.dumps(steps[:total]).encode()).hexdigest()[:16]  # resume refuses another plan
    start, _ = resume_state(run_dir, t, module, optimizer, scheduler, digest)
    if start and env.rank == 0:
        console.print(f"resumed from step {start} in {run_dir}")
    if env.rank == 0:
        dump_config(cfg, run_dir / "config.yaml")
    tracker = Tracker(run_dir, cfg.tracker, cfg.model_dump(mode="json"), resume_step=start, enabled=env.rank == 0)
    lengths = train_ds.lengths()
    counts = [objective.count(item) for item in train_ds.items]  # loss normaliser per item
    metrics: dict[str, float] = {}
    if start == 0 and eval_ds.items:
        metrics = eval_loss(module, eval_ds, cfg, objective, env)
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
                metrics.update(eval_loss(module, eval_ds, cfg, objective, env))
            tracker.log(done, metrics)
            if done == end or (t.save_every and done % t.save_every == 0):
                save_state(run_dir, done, module, optimizer, scheduler, digest, t.keep_checkpoints)
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
            with autocast(env.dtype, env.device):
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
    """Say what the run trains on, and what was dropped and why."""
    if env.rank != 0:
        return
    counts = {n: train_ds.sources.count(k) for k, n in enumerate(train_ds.names)}
    console.print(f"data: {len(train_ds.items)} train items {counts}, {len(eval_ds.items)} eval items")
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        for why, n in ds.dropped.items():
            console.print(f"[yellow]data: dropped {n} {name} items: {why}[/]")


def train_sft(cfg: SFTConfig) -> TrainResult:
    """Run SFT as configured; under torchrun every process calls this."""
    env = init_distributed(cfg.train, cfg.model)
    try:
        torch.manual_seed(cfg.train.seed)
        lm, tokenizer = load_model(cfg.model, cfg.chat, env.device)
        train_ds, eval_ds = load_datasets(cfg.data, tokenizer, cfg.chat, "sft")
        describe_data(train_ds, eval_ds, env)
        return fit(cfg, lm, tokenizer, train_ds, eval_ds, SFT, env)
    finally:
        env.close()
