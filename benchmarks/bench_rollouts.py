"""Rollout tokens per second: vLLM vs batched Hugging Face generate, on the GRPO shape.

GRPO samples G answers for each of a batch of prompts and each answer stops when
it stops: 16 prompts x 8 samples, natural stopping,
at most 256 new tokens, the embedded SmolLM2-135M-Instruct (float32 by default:
bfloat16 is several times slower on a CPU without AVX512-BF16). Both
engines go through `reason.engine` on the same chat-rendered synthetic problems
in the same run. "Useful" tokens are the ones in the samples (up to and including
EOS); HF also computes the padding up to the longest sample of its batch.

    python benchmarks/bench_rollouts.py [--prompts 16] [--samples 8] [--max-tokens 256]

HF runs first: starting vLLM in-process re-binds this process's OpenMP threads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def prompts_for(tokenizer, n: int, seed: int) -> list[str]:
    from reason.synthetic import generate_problems
    from reason.chat import ChatConfig, render_prompt

    chat = ChatConfig(system_prompt=None)  # a short prompt, as in a GRPO batch of math questions
    return [render_prompt(tokenizer, p.prompt, chat) for p in generate_problems(n, seed)]


def timed(engine, prompts: list[str], sp) -> dict:
    from reason.engine import SamplingConfig

    engine.generate(prompts[:2], SamplingConfig(max_tokens=8, seed=1))  # warm-up: first-call kernel set-up
    start = time.perf_counter()
    out = engine.generate(prompts, sp)
    seconds = time.perf_counter() - start
    lengths = [s.num_tokens for group in out for s in group]
    return {"seconds": seconds, "tokens": sum(lengths), "tok_s": sum(lengths) / seconds,
            "mean_len": statistics.mean(lengths), "max_len": max(lengths),
            "truncated": sum(s.finish_reason == "length" for g in out for s in g) / len(lengths)}


def report(name: str, r: dict) -> None:
    print(f"{name:>5}: {r['tokens']:6d} useful tokens in {r['seconds']:6.1f} s = {r['tok_s']:6.1f} tok/s "
          f"(mean length {r['mean_len']:.0f}, longest {r['max_len']}, truncated {r['truncated']:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from reason.engine import HFEngine, SamplingConfig, VLLMEngine
    from reason.models import load_pretrained, load_tokenizer, resolve

    model_dir = resolve(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompts = prompts_for(tokenizer, args.prompts, args.seed)
    sp = SamplingConfig(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    print(f"model {model_dir} ({args.dtype}), {args.prompts} prompts x {args.samples} samples, "
          f"max {args.max_tokens} tokens, temperature {args.temperature}, torch threads {torch.get_num_threads()}")

    hf = HFEngine(load_pretrained(model_dir, args.dtype).eval(), tokenizer, batch_size=args.prompts * args.samples)
    hf_r = timed(hf, prompts, sp)
    report("HF", hf_r)
    del hf

    start = time.perf_counter()
    vllm = VLLMEngine(model_dir, dtype=args.dtype, seed=args.seed, max_model_len=1024)
    print(f"vLLM start-up {time.perf_counter() - start:.1f} s")
    vllm_r = timed(vllm, prompts, sp)
    report("vLLM", vllm_r)
    print(f"vLLM / HF useful tok/s: {vllm_r['tok_s'] / hf_r['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
