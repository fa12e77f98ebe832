"""One GRPO update: padded micro-batches, policy log-probs, the loss, AdamW.

Paper knobs (the maths itself is in rl.losses): `algorithm.epochs` passes over each
batch against stored old log-probs, the clipped surrogate with DAPO clip-higher,
the aggregation mode, KL to the frozen reference (beta = 0.001 in Phi-4-plus),
the entropy bonus (gamma = 0.001), truncated importance sampling against the
engine's log-probs (`algorithm.tis_cap`), gradient accumulation over
`train.micro_batch` sequences and clipping at `optim.max_grad_norm`.

Each epoch is one optimiser step over the whole batch (verl's
ppo_mini_batch_size = the batch). Epoch 0 runs before any update, so its detached
log-probs are the old log-probs and the trainer's side of the rollout/trainer
mismatch: no extra forward pass. The loss of a micro-batch is weighted by its
share of the batch (tokens for token-mean, sequences otherwise), so the
accumulated gradient is that of the whole-batch loss.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rl.losses import entropy_from_logits, grpo_loss, tis_weights, token_logprobs


@dataclass
class Row:
    """One sequence to train on: its prompt, completion, and what the loss needs of it."""

    prompt_ids: list[int]
    ids: list[int]  # completion tokens
    rollout_logprobs: list[float]  # the engine's, raw (temperature 1)
    advantage: float = 0.0
    ref_logprobs: torch.Tensor | None = None  # [T] at the sampling temperature


@dataclass
class MicroBatch:
    """Rows padded for one forward. Consecutive rows with the same prompt (a GRPO
    group) share its forward: `prompts` holds it once, `prompt_of` maps rows to it."""

    prompts: torch.Tensor  # [u, P] distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [u, P]
    prompt_of: torch.Tensor  # [n] row -> its prompt's index in `prompts`, non-decreasing
    targets: torch.Tensor  # [n, T] completion ids, right-padded (pad where masked)
    mask: torch.Tensor  # [n, T] 1 on completion tokens
    rollout_logp: torch.Tensor  # [n, T]
    advantages: torch.Tensor  # [n]
    ref_logp: torch.Tensor | None  # [n, T]
    old_logp: torch.Tensor | None = None  # [n, T], set by epoch 0
    is_weights: torch.Tensor | None = None  # [n, T], set by epoch 0


def _pad(rows: list[list], width: int, value, left: bool = False) -> torch.Tensor:
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r)))
                         for r in rows])


def collate_groups(rows: list[Row], pad_id: int, device: torch.device) -> MicroBatch:
    starts = [i == 0 or r.prompt_ids != rows[i - 1].prompt_ids for i, r in enumerate(rows)]  # a new prompt
    distinct = [r.prompt_ids for r, new in zip(rows, starts) if new]
    p = max(len(x) for x in distinct)
    t = max(len(r.ids) for r in rows)
    ref = None
    if rows[0].ref_logprobs is not None:
        ref = torch.stack([torch.nn.functional.pad(r.ref_logprobs, (0, t - len(r.ids))) for r in rows])
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return MicroBatch(
        prompts=to(_pad(distinct, p, pad_id, left=True)),
        prompt_mask=to(_pad([[1] * len(x) for x in distinct], p, 0, left=True)),
        prompt_of=to(torch.tensor(starts).cumsum(0) - 1),
        targets=to(_pad([r.ids for r in rows], t, pad_id)), mask=to(_pad([[1] * len(r.ids) for r in rows], t, 0)),
        rollout_logp=to(_pad([r.rollout_logprobs for r in rows], t, 0.0).float()),
        advantages=to(torch.tensor([r.advantage for r in rows], dtype=torch.float32)), ref_logp=to(ref))


def _chunks(rows: list[Row], size: int) -> list[list[int]]:
    """Row indices cut into groups of `size`: a prompt's rows together (they share its
    forward), shorter prompts and completions first (less padding)."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].prompt_ids), rows[i].prompt_ids, len(rows[i].ids), i))
    return [order[k:k + size] for k in range(0, len(order), size)]


def micro_batches(rows: list[Row], size: int, pad_id: int, device: torch.device) -> list[MicroBatch]:
    return [collate_groups([rows[i] for i in chunk], pad_id, device) for chunk in _chunks(rows, size)]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


def completion_logits(lm, mb: MicroBatch) -> torch.Tensor:
    """Logits that predict each completion token: [n, T, V].

    Each distinct prompt runs once; its KV cache is repeated to the rows that
    share it and their completions attend to it (a group of G rows costs one
    prompt forward, not G). Gradients flow back through the repeated cache. Only
    completion positions go through the LM head.
    """
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    p = mb.prompts.shape[1]
    attention = torch.cat([mb.prompt_mask[mb.prompt_of], mb.mask], dim=1)  # [n, P+T]
    if getattr(lm, "is_gradient_checkpointing", False):  # HF drops the cache under checkpointing
        ids = torch.cat([mb.prompts[mb.prompt_of], mb.targets], dim=1)  # [n, P+T]
        hidden = decoder(input_ids=ids, attention_mask=attention, position_ids=_positions(attention),
                         use_cache=False).last_hidden_state  # [n, P+T, H]
        return head(hidden[:, p - 1:-1])
    prompt = decoder(input_ids=mb.prompts, attention_mask=mb.prompt_mask, position_ids=_positions(mb.prompt_mask),
                     past_key_values=DynamicCache(), use_cache=True)  # hidden [u, P, H]
    cache, counts = prompt.past_key_values, torch.bincount(mb.prompt_of)  # [u]
    # repeat_interleave, not indexing: indexing's CPU backward adds with atomics, and runs differ in the last bit
    for layer in cache.layers:  # [u, heads, P, d] -> [n, heads, P, d]
        layer.keys, layer.values = layer.keys.repeat_interleave(counts, 0), layer.values.repeat_interleave(counts, 0)
    hidden = decoder(input_ids=mb.targets, attention_mask=attention, position_ids=_positions(attention)[:, p:],
                     past_key_values=cache, use_cache=True).last_hidden_state  # [n, T, H]
    last = prompt.last_hidden_state[:, -1:].repeat_interleave(counts, 0)  # [n, 1, H]: predicts completion token 0
    return head(torch.cat([last, hidden[:, :-1]], dim=1))


@torch.no_grad()
def reference_logprobs(ref, rows: list[Row], size: int, pad_id: int, temperature: float,
                       autocast) -> list[torch.Tensor]:
    """The frozen reference's log-probs of each row's completion, [T_i] each, in row order."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    device = next(ref.parameters()).device
    for chunk in _chunks(rows, size):
        mb = collate_groups([rows[i] for i in chunk], pad_id, device)
        with autocast():
            logp = token_logprobs(completion_logits(ref, mb), mb.targets, temperature).float().cpu()  # [n, T]
        for j, i in enumerate(chunk):
            out[i] = logp[j, :len(rows[i].ids)]
    return out


def _weight(mb: MicroBatch, mode: str, tokens: int, seqs: int) -> float:
    """This micro-batch's share of the whole-batch loss under aggregation `mode`."""
    if mode == "token-mean":
        return float(mb.mask.sum()) / max(tokens, 1)
    return mb.mask.shape[0] / seqs


def _first_pass(mb: MicroBatch, logits: torch.Tensor, logp: torch.Tensor, temperature: float,
                tis_cap: float | None, sums: dict) -> None:
    """Epoch 0, before any update: store old log-probs and TIS weights, measure the mismatch."""
    mb.old_logp = logp.detach()
    raw = mb.old_logp if temperature == 1.0 else token_logprobs(logits.detach(), mb.targets)  # engine's are raw
    m = mb.mask.bool()
    gap = (raw - mb.rollout_logp).abs()[m]  # [tokens]
    sums["logprob_mismatch"] += float(gap.sum())
    sums["logprob_mismatch_max"] = max(sums["logprob_mismatch_max"], float(gap.max()) if gap.numel() else 0.0)
    if tis_cap is not None:
        mb.is_weights = tis_weights(raw, mb.rollout_logp, tis_cap)
        sums["tis_weight_mean"] += float(mb.is_weights[m].sum())


def train_on_batch(lm, optimizer, mbs: list[MicroBatch], algo, max_grad_norm: float, temperature: float,
                   max_len: int, autocast) -> dict[str, float]:
    """`algo.epochs` optimiser steps over the micro-batches; returns the step's metrics.

    `algo` is the recipe's AlgorithmConfig; `max_len` the Dr.GRPO normaliser
    (rollout.max_tokens); `autocast` a callable giving the compute-dtype context.
    Token-level metrics (kl, entropy, clip fractions, ratio_mean) are means over
    every token of every epoch; the mismatch and TIS weights are epoch 0's.
    """
    tokens = int(sum(mb.mask.sum() for mb in mbs))
    seqs = sum(mb.mask.shape[0] for mb in mbs)
    params = [p for p in lm.parameters() if p.requires_grad]
    first: dict[str, float] = defaultdict(float)  # epoch 0: sums over tokens, and the max gap
    per_token: dict[str, float] = defaultdict(float)  # token-weighted sums over all epochs
    out: dict[str, float] = defaultdict(float)
    for epoch in range(algo.epochs):
        optimizer.zero_grad(set_to_none=True)
        for mb in mbs:
            with autocast():
                logits = completion_logits(lm, mb)  # [n, T, V]
                logp = token_logprobs(logits, mb.targets, temperature)  # [n, T]
                with nullcontext() if algo.entropy_gamma > 0 else torch.no_grad():
                    entropy = entropy_from_logits(logits, temperature)  # [n, T]
            if epoch == 0:
                _first_pass(mb, logits, logp, temperature, algo.tis_cap, first)
            loss, stats = grpo_loss(
                logp, mb.old_logp, mb.advantages, mb.mask, ref_logp=mb.ref_logp, entropy=entropy,
                beta=algo.kl_beta, gamma=algo.entropy_gamma, kl_kind=algo.kl_type, clip_low=algo.clip_low,
                clip_high=algo.clip_high, is_weights=mb.is_weights, mode=algo.loss_agg, max_len=max_len)
            share = _weight(mb, algo.loss_agg, tokens, seqs)
            (loss * share).backward()
            out["loss"] += stats.pop("loss") * share / algo.epochs
            out["policy_loss"] += stats.pop("policy_loss") * share / algo.epochs
            out["ratio_max"] = max(out["ratio_max"], stats.pop("ratio_max"))
            for k, v in stats.items():
                per_token[k] += v * float(mb.mask.sum())
        out["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) / algo.epochs
        optimizer.step()
    out.update({k: v / max(tokens * algo.epochs, 1) for k, v in per_token.items()})
    out.update({k: v if k.endswith("_max") else v / max(tokens, 1) for k, v in first.items()})
    out["train_tokens"], out["train_sequences"] = tokens, seqs
    return dict(out)
