"""A ready-to-run GPU check: SFT MFU and one GRPO step on a 0.5B Qwen2-shaped model, chunked LM head.

    python benchmarks/gpu_check.py              # one H100/H200: sized for a few minutes, at most 8
    python benchmarks/gpu_check.py --cpu-smoke  # a tiny model on the CPU: does the script run at all

Run from the repository's root on a machine with torch and transformers (no vLLM, Ray,
pydantic or `pip install -e .` needed: it puts the root on sys.path and uses only the
torch-level parts of the trainers). The model has Qwen2-0.5B's shape with random
weights (benchmarks/bench_mfu.py), trained in bf16 autocast over float32 weights with
fused AdamW:
- SFT: packed rows of `--sft-len` tokens, several sequences each with restarting
  position ids, log-probs through the SFT forward (reason.logprobs.TokenLogProbs);
- GRPO: `--prompts` x `--group` rollouts of `--response` tokens from Hugging Face
  generate (random weights rarely sample the EOS, so nearly all run to the limit),
  reference log-probs from a frozen copy, then one update (rl.step.train_on_batch:
  KL beta 0.001, entropy 0.001, token-mean, TIS) with padded `--micro` row
  micro-batches and with packed `--micro-tokens` micro-batches;
- LoRA GRPO: the same padded update with rank-16 peft adapters on every linear layer
  (AdamW over the adapters only), when peft is installed.
Tokens/s count real tokens; MFU counts the FLOPs the work needs (bench_mfu's count:
6 x matmul parameters per token, 6 x vocab x d per predicted token, causal attention
per sequence) against the GPU's dense bf16 peak. Peak memory is
torch.cuda.max_memory_allocated per phase.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# The GRPO update's settings: Phi-4-reasoning-plus's (arXiv 2504.21318) with verl's clip, TIS on.
IGNORE = -100  # reason.chat.IGNORE_INDEX, whose module needs pydantic
ALGO = dict(clip_low=0.2, clip_high=0.2, loss_agg="token-mean", kl_beta=0.001, kl_type="low_var_kl",
            entropy_gamma=0.001, epochs=1, ratio_level="token", tis_mode="token_truncate", tis_cap=2.0,
            mask_truncated=False)


def model_config(smoke: bool):
    from transformers import Qwen2Config

    from bench_mfu import qwen2_config

    if not smoke:
        return qwen2_config(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2Config(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=256, max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(config, device):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 0.5B model is slow to initialise on the host
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sft_phase(args, config, device, autocast) -> dict:
    """Packed SFT steps; returns tokens/s and MFU over the steps after the warm-up ones."""
    import torch

    from bench_mfu import train_flops
    from reason.logprobs import TokenLogProbs

    lm = build(config, device)
    module = TokenLogProbs(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    seq = args.sft_len // 4  # four sequences a row, each with a prompt of a quarter of its length
    lengths = [seq] * (4 * args.sft_rows)
    ids = torch.randint(3, config.vocab_size, (args.sft_rows, args.sft_len), generator=g)
    pos = torch.arange(seq).repeat(4)[None].expand(args.sft_rows, -1)
    targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    targets[(pos < seq // 4) | (pos == seq - 1)] = IGNORE  # no loss on prompts, nor across sequences
    ids, pos, targets = ids.to(device), pos.contiguous().to(device), targets.to(device)
    n_targets = int((targets != IGNORE).sum())
    times = []
    for _ in range(args.sft_warmup + args.sft_steps):
        t0 = time.perf_counter()
        with autocast():
            loss = -module(ids, pos, targets).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sum(times[args.sft_warmup:]) / args.sft_steps
    flops = train_flops(config, lengths, n_targets)
    del lm, module, opt
    return {"tokens_per_s": ids.numel() / seconds, "tflops": flops / seconds / 1e12, "peak_gb": peak_gb(device),
            "loss": float(loss.detach())}


def rollouts(args, lm, device, autocast):
    """`--prompts` x `--group` completions from HF generate, as GRPO rows (advantages from random rewards)."""
    import torch

    from rl.losses import group_advantages
    from rl.packing import Row

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, lm.config.vocab_size, (args.prompt_len - 8 * k,), generator=g).tolist()
               for k in range(args.prompts) for _ in range(args.group)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # left-padded
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad(), autocast():
        out = lm.generate(ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=args.response, pad_token_id=0, eos_token_id=2)
    rows = []
    for prompt, completion in zip(prompts, out[:, width:].tolist()):
        done = 2 in completion
        ids = completion[:completion.index(2) + 1] if done else completion
        rows.append(Row(prompt, ids, [0.0] * len(ids), truncated=not done))
    rewards = torch.rand(len(rows), generator=g)
    for row, a in zip(rows, group_advantages(rewards, args.group).tolist()):
        row.advantage = a
    return rows


def grpo_phase(args, config, device, autocast, micro_tokens) -> list[dict]:
    """Rollouts, reference and engine-side log-probs, then one update in each micro-batch layout."""
    import copy

    import torch

    from bench_mfu import train_flops
    from rl.packing import micro_batches
    from rl.step import reference_logprobs, train_on_batch

    lm = build(config, device)
    t0 = time.perf_counter()
    rows = rollouts(args, lm, device, autocast)
    sync(device)
    gen_s = time.perf_counter() - t0
    completion = sum(len(r.ids) for r in rows)
    out = [{"phase": "GRPO rollouts (HF generate)", "tokens_per_s": completion / gen_s, "peak_gb": peak_gb(device),
            "note": f"{len(rows)} x {completion / len(rows):.0f} tokens in {gen_s:.0f}s"}]
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    t0 = time.perf_counter()
    for row, logp in zip(rows, reference_logprobs(lm, rows, args.micro, 0, 1.0, autocast)):
        row.rollout_logprobs = logp.tolist()  # stands in for the engine's: the policy's own, no grad
    for row, logp in zip(rows, reference_logprobs(ref, rows, args.micro, 0, 1.0, autocast, micro_tokens)):
        row.ref_logprobs = logp
    sync(device)
    out.append({"phase": "GRPO engine + reference log-probs", "tokens_per_s": 2 * completion / (time.perf_counter() - t0),
                "peak_gb": peak_gb(device), "note": "two no-grad passes"})
    del ref
    # lr 0: both layouts update the same weights, so their losses must agree (a cross-check)
    opt = torch.optim.AdamW(lm.parameters(), lr=0.0, fused=device.type == "cuda")
    algo = SimpleNamespace(**ALGO)
    distinct = {tuple(r.prompt_ids) for r in rows}
    flops = train_flops(config, [len(p) for p in distinct] + [len(r.ids) for r in rows], completion)
    for name, tokens in (("padded", None), ("packed", micro_tokens)):
        reset_peak(device)
        mbs = micro_batches(rows, args.micro, 0, device, tokens)
        t0 = time.perf_counter()
        m = train_on_batch(lm, opt, mbs, algo, 1.0, 1.0, args.response, autocast)
        sync(device)
        seconds = time.perf_counter() - t0
        layout = f"{args.micro} rows" if tokens is None else f"{tokens} tokens"
        out.append({"phase": f"GRPO update, {name} micro-batches", "tokens_per_s": completion / seconds,
                    "tflops": flops / seconds / 1e12, "peak_gb": peak_gb(device),
                    "note": f"{len(mbs)} x {layout}, padded {m['train/padded_fraction']:.1%}, loss {m['loss']:+.4f}"})
    out.append(lora_update(args, lm, rows, device, autocast))
    return out


def lora_update(args, lm, rows, device, autocast) -> dict:
    """One padded update of rank-16 adapters on the same rollouts (the trainer's model.lora: r 16, alpha 32)."""
    import torch

    from rl.packing import micro_batches
    from rl.step import train_on_batch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return {"phase": "LoRA GRPO update, padded", "note": "peft is not installed"}
    lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=0.0, fused=device.type == "cuda")
    reset_peak(device)
    mbs = micro_batches(rows, args.micro, 0, device)
    t0 = time.perf_counter()
    m = train_on_batch(lm, opt, mbs, SimpleNamespace(**ALGO), 1.0, 1.0, args.response, autocast)
    sync(device)
    seconds = time.perf_counter() - t0
    completion = sum(len(r.ids) for r in rows)
    return {"phase": "LoRA GRPO update, padded", "tokens_per_s": completion / seconds, "peak_gb": peak_gb(device),
            "note": f"r 16, {sum(p.numel() for p in opt.param_groups[0]['params']):,} trainable, loss {m['loss']:+.4f}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, a few tokens: a smoke test")
    p.add_argument("--sft-len", type=int, default=4096)
    p.add_argument("--sft-rows", type=int, default=4, help="packed rows per SFT micro-batch")
    p.add_argument("--sft-steps", type=int, default=6)
    p.add_argument("--sft-warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response", type=int, default=2048, help="max new tokens per rollout")
    p.add_argument("--micro", type=int, default=8, help="rows per padded GRPO micro-batch")
    p.add_argument("--micro-tokens", type=int, default=None, help="tokens per packed GRPO micro-batch "
                   "(default: 8 x (--prompt-len + --response))")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default from the GPU's name")
    args = p.parse_args()
    import torch

    from bench_mfu import PEAKS

    if args.cpu_smoke:
        args.sft_len, args.sft_rows, args.sft_steps, args.sft_warmup = 256, 2, 1, 1
        args.prompts, args.group, args.prompt_len, args.response, args.micro = 2, 4, 24, 16, 3
        device, autocast, peak, name = torch.device("cpu"), nullcontext, None, "cpu (smoke)"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible, so nothing was measured; "
                         "`--cpu-smoke` runs a tiny model on the CPU instead")
    else:
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
        torch.backends.cuda.matmul.allow_tf32 = True

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    micro_tokens = args.micro_tokens or 8 * (args.prompt_len + args.response)
    config = model_config(args.cpu_smoke)
    rows = []
    reset_peak(device)
    sft = sft_phase(args, config, device, autocast)
    rows.append({"phase": "SFT, packed", **sft, "note": f"{args.sft_rows} x {args.sft_len} tokens a micro-batch, "
                                                         f"loss {sft['loss']:.3f}"})
    reset_peak(device)
    rows += grpo_phase(args, config, device, autocast, micro_tokens)
    shape = "a tiny Qwen2 (smoke test; figures mean nothing)" if args.cpu_smoke else "Qwen2-0.5B shape"
    print(f"{name}; {shape}; bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}; torch {torch.__version__}")
    print(f"{'phase':<36} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}  note")
    for r in rows:
        tps = f"{r['tokens_per_s']:>10,.0f}" if "tokens_per_s" in r else f"{'-':>10}"
        tf = f"{r['tflops']:>8.1f}" if "tflops" in r else f"{'-':>8}"
        mfu = f"{r['tflops'] / peak:>6.1%}" if "tflops" in r and peak else f"{'-':>6}"
        mem = f"{r['peak_gb']:>8.1f}" if "peak_gb" in r else f"{'-':>8}"
        print(f"{r['phase']:<36} {tps} {tf} {mfu} {mem}  {r.get('note', '')}")


if __name__ == "__main__":
    main()
