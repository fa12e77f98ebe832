"""SFT model-FLOPs utilisation (MFU) on a GPU, for a ~0.5B-parameter model built from config.

The model has Qwen2-0.5B's shape (24 layers, d=896, 14 query / 2 KV heads, FFN
4864, vocab 151,936, tied embeddings: 494M parameters) with random weights, and
`reason`'s own SFT trainer (`distill.sft.train_sft`) trains it on packed
synthetic traces in the Phi-4 chat format, bf16 autocast over fp32 weights.

FLOPs count only work the trainer must do: 6 x (decoder matmul parameters) per
token, 6 x (vocab x d) per *target* token (the trainer never computes logits for
prompt positions), and causal attention within each packed sequence
(6 x layers x d_q x n^2 per sequence of n tokens). Padding is not counted.
MFU is against the GPU's dense bf16 peak (`--peak-tflops`, H100/H200 SXM: 989),
and, for reference, against an 8192^3 bf16 matmul measured in the same run.

    python benchmarks/bench_mfu.py [--max-len 4096 --rows 32 --micro 4 --steps 8]
                                   [--set train.compile=true --set model.attn_implementation=flex_attention]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, write_traces

sys.path.insert(0, str(ROOT / "tests"))
PEAKS = {"H100": 989.4, "H200": 989.4, "B200": 2250.0, "A100": 312.0}  # dense bf16 TFLOP/s


def qwen2_config(**token_ids):
    """Qwen2-0.5B's shape (494M parameters), for a model with random weights."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32_768,
                       rope_theta=1_000_000.0, tie_word_embeddings=True, **token_ids)


def build_model(directory: Path) -> Path:
    from tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = qwen2_config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_flops(c, lengths: list[int], targets: int) -> float:
    """Training FLOPs the work needs: sequences of `lengths` tokens with `targets` predicted tokens in all,
    on a model of config `c` (padding and recomputation not counted)."""
    head_dim = c.hidden_size // c.num_attention_heads
    d, d_q, d_kv = c.hidden_size, c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    layer_params = c.num_hidden_layers * (2 * d * d_q + 2 * d * d_kv + 3 * d * c.intermediate_size)
    return (6 * layer_params * sum(lengths) + 6 * c.vocab_size * d * targets
            + 6 * c.num_hidden_layers * d_q * sum(n * n for n in lengths))


def flops_per_token(cfg, model_dir: Path) -> tuple[float, float]:
    """(training FLOPs per real token, mean targets per token) over the training data."""
    from transformers import AutoConfig

    from distill.batches import load_datasets
    from reason.chat import prepare_tokenizer
    from reason.models import load_tokenizer

    tokenizer = prepare_tokenizer(load_tokenizer(model_dir), cfg.chat)
    train, _ = load_datasets(cfg.data, tokenizer, cfg.chat, "sft")
    lengths = [len(ex.input_ids) for (ex,) in train.items]
    targets = sum(sum(t != -100 for t in ex.labels) for (ex,) in train.items)
    tokens = sum(lengths)
    return train_flops(AutoConfig.from_pretrained(model_dir), lengths, targets) / tokens, targets / tokens


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--rows", type=int, default=32, help="packed rows per optimizer step")
    p.add_argument("--micro", type=int, default=4, help="rows per forward/backward")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--n", type=int, default=6000, help="synthetic problems")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default from the GPU's name")
    p.add_argument("--set", action="append", default=[], help="SFTConfig override, e.g. train.compile=true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mfu measures a GPU; none is visible")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        raise SystemExit(f"no known bf16 peak for {name!r}; pass --peak-tflops")

    from distill.sft import SFTConfig, train_sft
    from reason.config import parse_override, set_dotted
    from reason.records import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        traces = write_traces(Path(tmp) / "traces.jsonl", args.n, (1, 2, 3, 4))
        raw = {"model": {"path": str(model_dir)},
               "data": {"train": [{"path": traces}],
                        "eval_fraction": 0.0, "max_len": args.max_len, "packing": True},
               "optim": {"lr": 1e-5, "warmup_steps": 2},
               "train": {"out_dir": str(Path(tmp) / "run"), "batch_size": args.rows, "micro_batch": args.micro,
                         "max_steps": args.steps, "autocast": "bfloat16", "save_every": 0}}
        for item in args.set:
            set_dotted(raw, *parse_override(item))
        cfg = SFTConfig.model_validate(raw)
        per_token, target_share = flops_per_token(cfg, model_dir)
        train_sft(cfg)
        rows = [r for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl") if "loss" in r]
    timed = rows[args.warmup:]
    tokens_s = sum(r["tokens"] for r in timed) / sum(r["step_seconds"] for r in timed)
    achieved = per_token * tokens_s / 1e12
    measured = matmul_tflops()
    print(f"{name}: {args.steps} steps ({args.warmup} untimed) x {args.rows} packed rows x {args.max_len} tokens, "
          f"micro-batch {args.micro}, overrides {args.set or 'none'}")
    print(f"FLOPs per token {per_token / 1e9:.2f} G ({target_share:.0%} of tokens are targets)")
    print(f"tokens/s {tokens_s:,.0f}  model TFLOP/s {achieved:.0f}  peak memory {rows[-1]['peak_mem_gb']:.1f} GB  "
          f"final loss {rows[-1]['loss']:.3f}")
    print(f"MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s peak; {achieved / measured:.1%} of the "
          f"{measured:.0f} TFLOP/s an 8192^3 bf16 matmul reached here")


if __name__ == "__main__":
    main()
