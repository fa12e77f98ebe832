"""Where SFT/DPO run: one process or several under `torchrun`, on CPU or GPU.

Joining the torchrun group (gloo on CPU, nccl on GPU), wrapping in DDP or FSDP2
(`train.parallel`), gradient sync only on the last micro-batch, bf16 autocast
where the hardware has bf16 matmuls (`train.autocast`), regional torch.compile of
the decoder layers (`train.compile`), and peak-memory readings for the metrics.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this trainer started the process group, so it ends it

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def init_distributed(device: str) -> Env:
    """Join the torchrun process group when there is one (gloo on CPU, nccl on GPU)."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    owns = world > 1 and not dist.is_initialized()
    if owns:
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Env(rank, dist.get_world_size() if dist.is_initialized() else 1, dev, owns)


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


def use_bf16(setting: str, device: torch.device) -> bool:
    """Resolve train.autocast. A CPU without AVX512-BF16 or AMX runs bf16 matmuls
    ~50x slower than fp32 (measured), so "auto" keeps such CPUs in fp32."""
    if setting != "auto":
        return setting == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def autocast(cfg, env: Env):
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.train.autocast, env.device))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def compile_layers(lm) -> None:
    """torch.compile each decoder layer in place (regional compilation: one small graph
    reused by every layer, compiled once). Packed rows vary in length, hence dynamic."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    for layer in base.get_decoder().layers:
        layer.compile(dynamic=True)
