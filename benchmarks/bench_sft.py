"""SFT training throughput and peak memory: `reason`'s trainer against TRL's SFTTrainer.

Same model (default: the embedded SmolLM2-135M-Instruct), same tokenised examples
(the built-in synthetic traces in the Phi-4-reasoning chat format, assistant-only
loss), same packing length, rows per step, micro-batch, AdamW settings and
precision (bf16 autocast where the hardware has bf16 matmuls, else fp32). Each
trainer runs in its own process, so each peak memory is its own
(peak RSS on CPU, peak CUDA allocation on a GPU). Throughput counts real tokens
over the steps after `--warmup` steps, so start-up costs are left out.

    python benchmarks/bench_sft.py [--steps 12 --rows 8 --micro 4 --max-len 1024 --model default]

TRL runs from this environment when `import trl` works; otherwise from its own
virtual environment, `.venv-bench/`, created on first use (never in `.venv`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, precision, run_role, write_traces

BENCH_VENV = ROOT / ".venv-bench"
TRL_PACKAGES = ["torch==2.13.0", "transformers>=5.16.1,<5.20", "trl", "datasets"]


def sft_config(args, out_dir: str):
    from distill.sft import SFTConfig

    return SFTConfig.model_validate({
        "model": {"path": args.model},
        "data": {"train": [{"path": args.traces}],
                 "eval_fraction": 0.0, "max_len": args.max_len, "packing": True},
        "optim": {"lr": 1e-5, "warmup_steps": 2, "weight_decay": 1e-4, "max_grad_norm": 1.0},
        "train": {"out_dir": out_dir, "batch_size": args.rows, "micro_batch": args.micro, "max_steps": args.steps,
                  "autocast": args.autocast, "save_every": 0},
    })


def write_examples(args, path: Path) -> str:
    """Tokenise the training examples exactly as our trainer does, for TRL; returns the model dir."""
    from distill.batches import load_datasets
    from reason.chat import prepare_tokenizer
    from reason.models import load_tokenizer, resolve

    cfg = sft_config(args, "unused")
    model_dir = str(resolve(cfg.model.path))
    tokenizer = prepare_tokenizer(load_tokenizer(model_dir), cfg.chat)
    train, _ = load_datasets(cfg.data, tokenizer, cfg.chat, "sft")
    with path.open("w") as f:
        for (ex,) in train.items:
            f.write(json.dumps({"input_ids": ex.input_ids, "labels": ex.labels}) + "\n")
    return model_dir


def run_ours(args) -> dict:
    from distill.sft import train_sft
    from reason.records import read_jsonl

    with tempfile.TemporaryDirectory() as out:
        train_sft(sft_config(args, out))
        rows = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r]
    timed = rows[args.warmup:]
    return {"tokens": sum(r["tokens"] for r in timed), "seconds": sum(r["step_seconds"] for r in timed),
            "peak_mem_gb": rows[-1]["peak_mem_gb"], "final_loss": rows[-1]["loss"]}


def run_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from reason.train import peak_memory_gb

    data = load_dataset("json", data_files=args.examples, split="train")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    marks: list[tuple[float, int]] = []  # (time, tokens so far) at the end of each optimizer step
    seen = [0]

    def counting(collate):
        def wrapped(examples):
            seen[0] += sum(len(e["input_ids"]) for e in examples)
            return collate(examples)
        return wrapped

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append((time.perf_counter(), seen[0]))

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, per_device_train_batch_size=args.micro,
                        gradient_accumulation_steps=args.rows // args.micro, max_steps=args.steps,
                        learning_rate=1e-5, warmup_steps=2, weight_decay=1e-4, max_grad_norm=1.0,
                        lr_scheduler_type="linear", bf16=args.autocast == "bfloat16",
                        use_cpu=not torch.cuda.is_available(),
                        packing=True, max_length=args.max_len, logging_steps=1, save_strategy="no",
                        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Clock()])
        trainer.data_collator = counting(trainer.data_collator)
        start = time.perf_counter()
        trainer.train()
    times = [start] + [t for t, _ in marks]
    tokens = [0] + [n for _, n in marks]
    peak = peak_memory_gb(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # as our trainer reports it
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens[-1] - tokens[args.warmup], "seconds": times[-1] - times[args.warmup],
            "peak_mem_gb": peak, "final_loss": losses[-1] if losses else float("nan")}


def trl_python() -> str:
    """An interpreter that can import trl: this one, or .venv-bench (made on first use)."""
    if importlib.util.find_spec("trl") is not None:
        return sys.executable
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return str(python)


def worker(python: str, role: str, args, extra: list[str]) -> dict:
    cmd = [python, __file__, "--role", role, "--steps", str(args.steps), "--rows", str(args.rows),
           "--micro", str(args.micro), "--max-len", str(args.max_len), "--n", str(args.n),
           "--warmup", str(args.warmup), "--model", args.model, "--autocast", args.autocast,
           "--traces", args.traces, *extra]
    return run_role(cmd, role, args.threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--rows", type=int, default=8, help="packed rows per optimizer step")
    p.add_argument("--micro", type=int, default=4, help="rows per forward/backward")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--n", type=int, default=400, help="synthetic problems")
    p.add_argument("--autocast", choices=["auto", "none", "bfloat16"], default="auto",
                   help="auto: bf16 on GPUs and on CPUs with bf16 matmul units, else fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads per trainer (0: torch's default); "
                   "1 is steadier on a machine shared with other jobs")
    p.add_argument("--role", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--examples", help=argparse.SUPPRESS)
    p.add_argument("--traces", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        print(json.dumps(run_ours(args) if args.role == "ours" else run_trl(args)))
        return
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.autocast = "bfloat16" if precision(args.autocast) == "bfloat16" else "none"  # one decision for both
    with tempfile.TemporaryDirectory() as tmp:
        args.traces = write_traces(Path(tmp) / "traces.jsonl", args.n, (1, 2))
        examples = Path(tmp) / "examples.jsonl"
        model_dir = write_examples(args, examples)
        ours = worker(sys.executable, "ours", args, [])
        trl = worker(trl_python(), "trl", args, ["--examples", str(examples), "--model-dir", model_dir])
    print(f"model {args.model} on {device}, {args.steps} steps ({args.warmup} untimed) of {args.rows} packed rows "
          f"x {args.max_len} tokens, micro-batch {args.micro}, autocast {args.autocast}, "
          f"threads {args.threads or 'default'}")
    print(f"{'trainer':<8} {'tokens/s':>10} {'peak mem GB':>12} {'final loss':>11}")
    for name, r in (("reason", ours), ("trl", trl)):
        print(f"{name:<8} {r['tokens'] / r['seconds']:>10.0f} {r['peak_mem_gb']:>12.2f} {r['final_loss']:>11.4f}")
    speed = (ours["tokens"] / ours["seconds"]) / (trl["tokens"] / trl["seconds"])
    print(f"ratio reason/trl: tokens/s {speed:.2f}x, peak memory {ours['peak_mem_gb'] / trl['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
