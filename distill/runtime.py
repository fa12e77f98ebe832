"""Where SFT/DPO run: one process or several under `torchrun`, on CPU or GPU.

Joining the torchrun group (gloo on CPU, nccl on GPU), wrapping in DDP or FSDP2
(`train.parallel`), gradient sync only on the last micro-batch, and regional
torch.compile of the decoder layers (`train.compile`).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reason.train import check_weights_dtype, compute_dtype, keep_freed_blocks, pick_device


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this trainer started the process group, so it ends it
    dtype: torch.dtype = torch.float32  # compute precision (reason.train.compute_dtype)

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def init_distributed(train, model) -> Env:
    """Join the torchrun process group when there is one (gloo on CPU, nccl on GPU), and
    settle the compute precision by the one rule (a refused setting fails before any work)."""
    dev = pick_device(train.device, int(os.environ.get("LOCAL_RANK", "0")))
    keep_freed_blocks(dev)
    cuda = dev.type == "cuda"
    owns = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owns:
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
    check_weights_dtype(model.dtype, dev)
    dtype = compute_dtype(train.autocast, dev)
    if dist.is_initialized():
        return Env(dist.get_rank(), dist.get_world_size(), dev, owns, dtype)
    return Env(0, 1, dev, owns, dtype)


def parallelize(module: torch.nn.Module, how: str, env: Env) -> torch.nn.Module:
    """DDP or FSDP2 (one shard unit per decoder layer) around a module whose `.lm` is the causal LM."""
    if env.world == 1:
        return module
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in module.lm.get_decoder().layers:
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers (rotary frequencies) are equal everywhere; broadcasting them would add a collective per forward.
    return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               broadcast_buffers=False)


def sync_grads(module, on: bool):
    """DDP/FSDP2: reduce gradients only on the last micro-batch of a step."""
    if hasattr(module, "no_sync"):
        return nullcontext() if on else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(on)
    return nullcontext()


def all_reduce(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if dist.is_initialized():
        for v in sums.values():
            dist.all_reduce(v)
    return sums


def compile_layers(lm) -> None:
    """torch.compile each decoder layer in place (regional compilation: one small graph
    reused by every layer, compiled once). Packed rows vary in length, hence dynamic."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    for layer in base.get_decoder().layers:
        layer.compile(dynamic=True)
