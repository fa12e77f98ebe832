"""A memory plan before a run starts: what one GPU holds for a recipe, row by row, and whether it fits.

Pure arithmetic on a model's shape (read from its config.json, no weights loaded) and
a recipe's settings (`Setup`): weights, gradients, AdamW's two moments, the bf16 casts
autocast keeps of fp32 weights, a frozen reference model, the LM head's logits chunk,
the decoder's activations for one micro-batch, and the colocated vLLM engine's share.
`reason rl train --plan` and `reason distill sft --plan` print it (`format_plan`) and
refuse a plan that does not fit, naming the keys that would make it fit (`remedies`).

The activation factors were measured with torch.autograd.graph.saved_tensors_hooks on
transformers 5.19's Phi3 decoder layer (sdpa attention), per token and layer: 16 bytes
x hidden (RMSNorm's fp32 upcasts) + compute-dtype elements 6 x hidden + 3 x kv_dim + 4 x
intermediate + 4 bytes x heads (attention's fp32 logsumexp). Under gradient
checkpointing a layer keeps only its input, the residual stream, which is in the
weights' dtype (fp32 under autocast over fp32 weights). Sizes are in GiB (2**30 bytes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from reason.errors import UserError

GiB = 2**30
CUDA_CONTEXT = 1 * GiB  # CUDA context and allocator slack (assumed)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's dimensions, as its config.json gives them."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # hidden // heads when the config does not say

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)


SHAPES = {  # for planning where the weights are not present
    "phi-4": Shape(hidden=5120, layers=40, heads=40, kv_heads=10, intermediate=17920, vocab=100352, tied=False),
    "phi-4-mini": Shape(hidden=3072, layers=32, heads=24, kv_heads=8, intermediate=8192, vocab=200064, tied=True),
}


def linears(s: Shape) -> dict[str, tuple[int, int]]:
    """One decoder layer's projections, name -> (in, out), unfused (LLaMA names)."""
    h, i = s.hidden, s.intermediate
    return {"q_proj": (h, s.q_dim), "k_proj": (h, s.kv_dim), "v_proj": (h, s.kv_dim), "o_proj": (s.q_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def param_count(s: Shape) -> int:
    """Parameters: embeddings (twice when untied), projections and RMSNorm gains; no biases.

    >>> param_count(SHAPES["phi-4"]), param_count(SHAPES["phi-4-mini"])
    (14659507200, 3836021760)
    """
    layer = sum(a * b for a, b in linears(s).values()) + 2 * s.hidden
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * layer + s.hidden


def lora_param_count(s: Shape, r: int, targets: str | list[str] = "all-linear") -> int:
    """LoRA's A and B over the targeted projections: r x (in + out) each, every layer."""
    names = set(LORA_MODULES) if targets == "all-linear" else {
        m for t in ([targets] if isinstance(targets, str) else targets) for m in FUSED.get(t, (t,))}
    return s.layers * sum(r * (a + b) for n, (a, b) in linears(s).items() if n in names)


def layer_activation_bytes(s: Shape, compute: int) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing (measured factors above)."""
    return 16 * s.hidden + compute * (6 * s.hidden + 3 * s.kv_dim + 4 * s.intermediate) + 4 * s.heads


@dataclass(frozen=True)
class Setup:
    """What the plan needs of a recipe. Bytes per element: 4 fp32, 2 bf16."""

    weight_bytes: int  # model.dtype: weights, gradients and Adam moments share it (torch AdamW)
    compute_bytes: int  # train.autocast: 2 under bf16, else 4
    tokens: int  # decoder positions per micro-batch
    head_positions: int  # positions through the LM head per micro-batch
    logits_chunk: int  # train.logits_chunk; 0: all head positions at once
    checkpointing: bool  # model.gradient_checkpointing
    lora_r: int | None = None  # model.lora.r
    lora_targets: str | list[str] = "all-linear"
    entropy_grad: bool = False  # GRPO with algorithm.entropy_gamma > 0: the softmax is kept for backward
    reference: bool = False  # GRPO with algorithm.kl_beta > 0 and no LoRA (LoRA's reference is the base)
    rollout_fraction: float = 0.0  # rollout.gpu_memory_utilization where vLLM colocates; else 0
    shards: int = 1  # FSDP's world size: weights, gradients and Adam state split that many ways
    cuda: bool = True  # add the CUDA context


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    note: str


def activations(s: Shape, st: Setup, checkpointing: bool) -> float:
    """One micro-batch's saved activations: every layer's, or with checkpointing each layer's input
    plus one layer recomputed in backward (counted twice: its activations and their gradients)."""
    outside = 10 * s.hidden * st.tokens  # the final norm's fp32 tensors (measured)
    layer = layer_activation_bytes(s, st.compute_bytes) * st.tokens
    if not checkpointing:
        return s.layers * layer + outside
    return s.layers * st.tokens * s.hidden * st.weight_bytes + 2 * layer + outside


def logits_bytes(s: Shape, st: Setup) -> float:
    """The LM head's live [chunk, vocab] block in fp32, its gradient, and the softmax when the entropy has one."""
    rows = min(st.logits_chunk, st.head_positions) if st.logits_chunk else st.head_positions
    return rows * s.vocab * 4 * (3 if st.entropy_grad else 2)


def plan(s: Shape, st: Setup, device_bytes: float) -> list[Item]:
    """The rows of the plan, in bytes; their sum is what the GPU must hold at the step's peak."""
    p = param_count(s)
    trained = p if st.lora_r is None else lora_param_count(s, st.lora_r, st.lora_targets)
    wb, cb, n = st.weight_bytes, st.compute_bytes, st.shards
    dt = {4: "fp32", 2: "bf16"}
    shard = f", / {n} (FSDP)" if n > 1 else ""
    lora = "" if st.lora_r is None else f" (LoRA r={st.lora_r}: {trained / 1e6:.1f}M trained)"
    rows = [Item("weights", p * wb / n, f"{p / 1e9:.2f}B params x {wb} B ({dt[wb]}){shard}"),
            Item("gradients", trained * wb / n, f"{dt[wb]}, the trained params{lora}{shard}"),
            Item("optimizer", 2 * trained * wb / n, f"AdamW exp_avg + exp_avg_sq in {dt[wb]}{shard}")]
    if cb < wb and st.lora_r is None:
        rows.append(Item("autocast casts", p * cb, "the bf16 copy autocast caches of every trained weight"))
    if st.reference:
        rows.append(Item("reference", p * cb, f"frozen copy in {dt[cb]} (algorithm.kl_beta > 0)"))
    chunk = st.logits_chunk or "all"
    rows.append(Item("logits", logits_bytes(s, st), f"[{chunk}, {s.vocab}] fp32 + grad"
                     + (" + softmax" if st.entropy_grad else "")))
    act = activations(s, st, st.checkpointing)
    if st.checkpointing:
        note = (f"{s.layers} layer inputs x {st.tokens} tokens x {s.hidden} x {wb} B + one layer recomputed "
                f"(without checkpointing: {activations(s, st, False) / GiB:.1f} GiB)")
    else:
        note = f"{s.layers} layers x {st.tokens} tokens x {layer_activation_bytes(s, cb)} B"
    rows.append(Item("activations", act, note))
    if st.rollout_fraction:
        rows.append(Item("rollout engine", st.rollout_fraction * device_bytes,
                         f"vLLM: rollout.gpu_memory_utilization {st.rollout_fraction} x device"))
    if st.cuda:
        rows.append(Item("CUDA context", CUDA_CONTEXT, "and allocator slack (assumed)"))
    return rows


def total(rows: list[Item]) -> float:
    return sum(r.bytes for r in rows)


def changes(s: Shape, st: Setup, device_bytes: float) -> list[tuple[str, dict]]:
    """The config changes that would shrink the plan: (what to set, the Setup fields it changes)."""
    out = []
    if st.lora_r is None:
        out.append(("model.lora: {r: 16} (adapters only: no full gradients, Adam state, casts or reference)",
                    {"lora_r": 16, "reference": False}))
    if st.reference:
        out.append(("algorithm.kl_beta=0 (no reference model)", {"reference": False}))
    if st.rollout_fraction:
        need = 2 * param_count(s) / device_bytes  # vLLM's own bf16 weights, before any KV cache
        low = -(-round((need + 0.1) * 100) // 5) * 5 / 100  # leave 0.1 of the device for its KV cache
        if low < st.rollout_fraction:
            out.append((f"rollout.gpu_memory_utilization={low:g} (vLLM's bf16 weights take {need:.2f} of the device)",
                        {"rollout_fraction": low}))
    if not st.checkpointing:
        out.append(("model.gradient_checkpointing=true", {"checkpointing": True}))
    out.append(("train.micro_batch_tokens / train.micro_batch / data.max_len: half the tokens per micro-batch",
                {"tokens": st.tokens // 2, "head_positions": st.head_positions // 2}))
    if not st.logits_chunk or st.logits_chunk > 512:
        out.append(("train.logits_chunk=512", {"logits_chunk": 512}))
    return out


def remedies(s: Shape, st: Setup, device_bytes: float) -> list[str]:
    """Each change with what it saves, the largest first; then a set of them that fits, if one does."""
    base = total(plan(s, st, device_bytes))
    saved = [(base - total(plan(s, replace(st, **c), device_bytes)), key, c) for key, c in changes(s, st, device_bytes)]
    saved = sorted((x for x in saved if x[0] > 0), key=lambda x: -x[0])
    lines = [f"{key}: saves {gain / GiB:.1f} GiB" for gain, key, _ in saved]
    current, picked = st, []
    for _, key, c in saved:  # greedily, the largest saving first
        if total(plan(s, current, device_bytes)) <= device_bytes:
            break
        current, picked = replace(current, **c), picked + [key.split(":")[0].split("=")[0]]
    need = total(plan(s, current, device_bytes))
    if need <= device_bytes:
        lines.append(f"together, {' + '.join(picked)}: {need / GiB:.1f} GiB, fits")
    else:
        lines.append(f"all of them together still need {need / GiB:.1f} GiB: shard the model over GPUs "
                     "(SFT: train.parallel=fsdp under torchrun, --gpus N; GRPO: reason rl submit --engine verl)")
    return lines


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB' or '80' -> bytes; GB is read as GiB, as GPU memory is sold.

    >>> parse_memory("80GB") == 80 * GiB
    True
    """
    t = text.strip().upper().replace(" ", "")
    for unit in ("GIB", "GB", "G"):
        if t.endswith(unit):
            t = t[: -len(unit)]
            break
    return float(t) * GiB


def shape_of(config) -> Shape:
    """A Shape from a transformers config object (or anything with its attribute names)."""
    heads = config.num_attention_heads
    return Shape(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 intermediate=config.intermediate_size, vocab=config.vocab_size,
                 tied=bool(getattr(config, "tie_word_embeddings", False)),
                 head_dim=getattr(config, "head_dim", None))


def load_shape(name: str | None, model_path: str) -> tuple[Shape, str]:
    """--shape NAME | config.json | model dir, else the recipe's model.path; read without loading weights."""
    if name in SHAPES:
        return SHAPES[name], f"--shape {name}"
    if name is not None and Path(name).is_file():
        return shape_of(SimpleNamespace(**json.loads(Path(name).read_text()))), name
    if name is not None and not Path(name).is_dir():
        raise UserError(f"--shape {name}: not one of {', '.join(SHAPES)}, a config.json or a model directory")
    from transformers import AutoConfig

    from reason.models import resolve

    key = "--shape" if name else "model.path"
    path = resolve(name or model_path, key)
    try:
        return shape_of(AutoConfig.from_pretrained(path)), f"{key} {path}"
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: cannot read {path}'s config.json: {str(e).splitlines()[0]}; "
                        f"plan from a named shape with --shape {' or '.join(SHAPES)}") from None


def device_memory(text: str | None) -> float:
    """--device-memory, else the visible GPU's total memory; refused on a machine without one."""
    if text is not None:
        try:
            return parse_memory(text)
        except ValueError:
            raise UserError(f"--device-memory {text!r}: expected a size such as 80GB") from None
    import torch

    if not torch.cuda.is_available():
        raise UserError("--plan: no GPU is visible here; give the device's memory, e.g. --device-memory 80GB")
    return float(torch.cuda.get_device_properties(0).total_memory)


def format_plan(rows: list[Item], device_bytes: float, title: str, assumptions: list[str]) -> str:
    """The plan as text: one row per item, the total, the headroom, then each assumption in a line."""
    width = max(len(r.name) for r in rows)
    lines = [title, f"{'':<{width}}  {'GiB':>7}"]
    lines += [f"{r.name:<{width}}  {r.bytes / GiB:>7.1f}  {r.note}" for r in rows]
    used = total(rows)
    lines += [f"{'total':<{width}}  {used / GiB:>7.1f}",
              f"{'device':<{width}}  {device_bytes / GiB:>7.1f}",
              f"{'headroom':<{width}}  {(device_bytes - used) / GiB:>7.1f}  "
              + ("fits" if used <= device_bytes else "DOES NOT FIT")]
    return "\n".join(lines + ["assumptions:"] + [f"  - {a}" for a in assumptions])


def assumptions(st: Setup) -> list[str]:
    """What the plan takes as given, one line each."""
    out = [f"weights, gradients and AdamW moments in {'fp32' if st.weight_bytes == 4 else 'bf16'} (model.dtype); "
           + ("they are the master weights" if st.weight_bytes == 4 else "no fp32 master copy"),
           f"compute in {'bf16' if st.compute_bytes == 2 else 'fp32'} (train.autocast)",
           f"{st.tokens} decoder tokens and {st.head_positions} LM-head positions per micro-batch",
           "activation factors measured on transformers' Phi3 layer with sdpa (no [T, T] scores kept)",
           "at the peak every row is live at once (later micro-batches run beside accumulated gradients)"]
    if st.rollout_fraction:
        out.append("vLLM colocates: its share holds its own bf16 weights and KV cache")
    if st.shards > 1:
        out.append(f"FSDP over {st.shards} GPUs shards weights, gradients and Adam state; the gathered layer "
                   "is not counted")
    return out


def report(s: Shape, st: Setup, device_bytes: float, title: str) -> bool:
    """Print the plan; when it does not fit, a refusal naming what to change. True when it fits."""
    from reason.console import console

    rows = plan(s, st, device_bytes)
    print(format_plan(rows, device_bytes, title, assumptions(st)))
    if total(rows) <= device_bytes:
        return True
    over = (total(rows) - device_bytes) / GiB
    console.print(f"[bold red]refused:[/] the plan needs {over:.1f} GiB more than the device has; change:",
                  highlight=False)
    for line in remedies(s, st, device_bytes):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    return False
