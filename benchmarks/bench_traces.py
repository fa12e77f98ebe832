"""Teacher traces per second: local vLLM engine vs Hugging Face generate, same model, same run.

Both engines go through the real trace path, `distill.generate.generate_traces`
(chat rendering with the Phi-4 system prompt, k samples per problem, the
normaliser, the resumable appender), on the same built-in synthetic problems
and the same GenerateConfig (temperature 0.8, top_p 0.95). The model is the
embedded SmolLM2-135M-Instruct. It rarely writes a splittable trace, so the
throughput counted is responses per second (every (problem, sample) pair
processed, written as a trace or counted as a failure); both numbers are printed.
Engine start-up is timed apart; each engine is warmed up before it is timed.

    python benchmarks/bench_traces.py [--problems 16] [--k 4] [--max-tokens 512]

HF runs first: starting vLLM in-process re-binds this process's OpenMP threads.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def timed_run(name: str, engine, problems, cfg, out_dir: Path) -> float:
    """Run generate_traces with a live engine; print and return responses per second."""
    from distill.generate import generate_traces
    from reason.engine import SamplingConfig

    engine.generate(["Hello"], SamplingConfig(max_tokens=8, seed=1))  # warm-up: first-call kernel set-up
    start = time.perf_counter()
    report = generate_traces(problems, out_dir / f"{name}.jsonl", cfg.model_copy(update={"engine": name}),
                             engine=engine)
    seconds = time.perf_counter() - start
    responses = report.generated + report.failed
    print(f"{name:>5}: {responses} responses in {seconds:6.1f} s = {responses / seconds:6.2f} responses/s; "
          f"{report.generated} traces = {report.generated / seconds:6.2f} traces/s; failures {report.failures}")
    return responses / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--max-tokens", type=int, default=512)
    # bfloat16 is several times slower than float32 on a CPU without AVX512-BF16.
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from distill.generate import GenerateConfig
    from reason.synthetic import generate_problems
    from reason.engine import HFEngine, VLLMEngine
    from reason.models import load_pretrained, load_tokenizer, resolve

    model_dir = resolve(args.model)
    problems = generate_problems(args.problems, args.seed, levels=(1, 2, 3))
    cfg = GenerateConfig(model=str(model_dir), k=args.k, max_tokens=args.max_tokens, seed=args.seed,
                         dtype=args.dtype, concurrency=args.problems)  # one engine call: batching is the engine's
    print(f"model {model_dir} ({args.dtype}), {args.problems} problems x k={args.k}, max {args.max_tokens} tokens, "
          f"temperature {cfg.temperature}, top_p {cfg.top_p}, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)  # HF samples from torch's global generator
        hf = HFEngine(load_pretrained(model_dir, args.dtype).eval(), load_tokenizer(model_dir),
                      batch_size=args.problems * args.k)
        hf_rate = timed_run("hf", hf, problems, cfg, Path(tmp))
        del hf
        start = time.perf_counter()
        # 1024 holds the Phi-4 system prompt and a synthetic problem.
        vllm = VLLMEngine(model_dir, dtype=args.dtype, seed=args.seed, max_model_len=args.max_tokens + 1024)
        print(f"vLLM start-up {time.perf_counter() - start:.1f} s (not counted)")
        vllm_rate = timed_run("vllm", vllm, problems, cfg, Path(tmp))
    print(f"vLLM / HF responses per second: {vllm_rate / hf_rate:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
