"""One GRPO update: micro-batch forwards, policy log-probs, the loss, AdamW.

Paper knobs (the maths itself is in rl.losses): `algorithm.epochs` passes over each
batch against stored old log-probs, the clipped surrogate with DAPO clip-higher (or
GSPO's sequence ratio, `algorithm.ratio_level`), the aggregation mode, KL to the
frozen reference (beta = 0.001 in Phi-4-plus), the entropy bonus (gamma = 0.001),
importance sampling against the engine's log-probs (`algorithm.tis_mode`,
`algorithm.tis_cap`), DAPO's overlong filtering (`algorithm.mask_truncated`),
gradient accumulation over micro-batches (rl.packing) and clipping at
`optim.max_grad_norm`.

Each epoch is one optimiser step over the whole batch (verl's
ppo_mini_batch_size = the batch). Epoch 0 runs before any update, so its detached
log-probs are the old log-probs and the trainer's side of the rollout/trainer
mismatch: no extra forward pass. The loss of a micro-batch is weighted by its
share of the batch (tokens for token-mean, sequences otherwise), so the
accumulated gradient is that of the whole-batch loss. Log-probs come from the LM
head `train.logits_chunk` positions at a time (reason.logprobs), over completion
positions only.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import DynamicCache

from reason.logprobs import DEFAULT_CHUNK, HeadLogProbs, head_logprobs
from rl.losses import grpo_loss, mask_truncated, sequence_mask_weights, tis_weights
from rl.packing import SHARED_PROMPT, MicroBatch, Row, collate_groups, padding, plan, shared_prompt_mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


def _padded_hidden(lm, mb: MicroBatch) -> torch.Tensor:
    """Hidden states that predict each completion token of a padded micro-batch: [n, T, H].

    Each distinct prompt runs once; its KV cache is repeated to the rows that
    share it and their completions attend to it (a group of G rows costs one
    prompt forward, not G). Gradients flow back through the repeated cache.
    """
    decoder = lm.get_decoder()
    p = mb.prompts.shape[1]
    attention = torch.cat([mb.prompt_mask[mb.prompt_of], mb.mask], dim=1)  # [n, P+T]
    if getattr(lm, "is_gradient_checkpointing", False):  # HF drops the cache under checkpointing
        ids = torch.cat([mb.prompts[mb.prompt_of], mb.targets], dim=1)  # [n, P+T]
        hidden = decoder(input_ids=ids, attention_mask=attention, position_ids=_positions(attention),
                         use_cache=False).last_hidden_state  # [n, P+T, H]
        return hidden[:, p - 1:-1]
    prompt = decoder(input_ids=mb.prompts, attention_mask=mb.prompt_mask, position_ids=_positions(mb.prompt_mask),
                     past_key_values=DynamicCache(), use_cache=True)  # hidden [u, P, H]
    cache, counts = prompt.past_key_values, torch.bincount(mb.prompt_of)  # [u]
    # repeat_interleave, not indexing: indexing's CPU backward adds with atomics, and runs differ in the last bit
    for layer in cache.layers:  # [u, heads, P, d] -> [n, heads, P, d]
        layer.keys, layer.values = layer.keys.repeat_interleave(counts, 0), layer.values.repeat_interleave(counts, 0)
    hidden = decoder(input_ids=mb.targets, attention_mask=attention, position_ids=_positions(attention)[:, p:],
                     past_key_values=cache, use_cache=True).last_hidden_state  # [n, T, H]
    last = prompt.last_hidden_state[:, -1:].repeat_interleave(counts, 0)  # [n, 1, H]: predicts completion token 0
    return torch.cat([last, hidden[:, :-1]], dim=1)


def _packed_hidden(lm, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the packed sequence (no padding, each prompt once): the hidden states that predict each
    completion token, [N, H], and each token's flat index in [n, T]."""
    pk, decoder = mb.packed, lm.get_decoder()
    impl = decoder.config._attn_implementation
    if impl == "sdpa" and not getattr(lm, "is_gradient_checkpointing", False):
        # Segment by segment, not over a dense [L, L] mask. Not under checkpointing: its recompute in the
        # backward would find the name restored.
        decoder.config._attn_implementation = SHARED_PROMPT
        try:
            h = decoder(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False,
                        shared_prompt=pk.segments).last_hidden_state[0]  # [L, H]
        finally:
            decoder.config._attn_implementation = impl
    else:
        h = decoder(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False,
                    attention_mask=shared_prompt_mask(pk, impl)).last_hidden_state[0]  # [L, H]
    n, t = mb.mask.shape
    started = mb.mask[:, 0].bool()  # [n] rows with at least one token
    # a prompt's last position predicts token 0 of each of its rows: repeat_interleave, as in _padded_hidden
    first = h[pk.last_prompt].repeat_interleave(torch.bincount(mb.prompt_of[started], minlength=len(pk.last_prompt)), 0)
    first_at = torch.arange(n, device=h.device)[started] * t  # [n'] flat index of token 0
    inner_at = mb.mask[:, 1:].bool().flatten().nonzero()[:, 0]  # [N - n'] in [n, T-1]: row r, token j+1
    inner_at = inner_at + inner_at // (t - 1) + 1 if t > 1 else inner_at  # -> flat index in [n, T]
    return torch.cat([first, h[pk.inner]]), torch.cat([first_at, inner_at])


def completion_logprobs(lm, mb: MicroBatch, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                        entropy: bool = False, entropy_grad: bool = True, raw: bool = False) -> HeadLogProbs:
    """log p of every completion token (and the entropy, and the raw temperature-1 log-probs) as [n, T] grids,
    0 where masked. Only completion positions reach the LM head, `chunk` at a time."""
    if mb.packed is not None:
        hidden, at = _packed_hidden(lm, mb)  # [N, H], [N] each token's flat index in [n, T]
    else:
        keep = mb.mask.bool()  # [n, T]
        hidden, at = _padded_hidden(lm, mb)[keep], keep.flatten().nonzero()[:, 0]
    head = lm.get_output_embeddings()
    out = head_logprobs(head, hidden, mb.targets.flatten()[at], temperature, chunk, entropy, raw, entropy_grad)
    n, t = mb.mask.shape

    def grid(v):  # [N] -> [n, T]; index_put's backward gathers, so it is exact and deterministic
        return None if v is None else v.new_zeros(n * t).index_put((at,), v).view(n, t)

    return HeadLogProbs(*(grid(v) for v in out))


@torch.no_grad()
def reference_logprobs(ref, rows: list[Row], size: int, pad_id: int, temperature: float, autocast,
                       tokens: int | None = None, chunk: int = DEFAULT_CHUNK) -> list[torch.Tensor]:
    """The frozen reference's log-probs of each row's completion, [T_i] each, in row order."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    device = next(ref.parameters()).device
    for part in plan(rows, size, tokens):
        mb = collate_groups([rows[i] for i in part], pad_id, device, packed=tokens is not None)
        with autocast():
            logp = completion_logprobs(ref, mb, temperature, chunk).logp.float().cpu()  # [n, T]
        for j, i in enumerate(part):
            out[i] = logp[j, :len(rows[i].ids)]
    return out


def _first_pass(mb: MicroBatch, stats: HeadLogProbs, algo, sums: dict) -> None:
    """Epoch 0, before any update: store old log-probs and importance weights, measure the mismatch."""
    mb.old_logp = stats.logp.detach()
    m = mb.mask.bool()
    gap = (stats.raw - mb.rollout_logp).abs()[m]  # [tokens]; the engine's log-probs are raw (temperature 1)
    sums["logprob_mismatch"] += float(gap.sum())
    sums["logprob_mismatch_max"] = max(sums["logprob_mismatch_max"], float(gap.max()) if gap.numel() else 0.0)
    if algo.tis_cap is None:
        return
    if algo.tis_mode == "sequence_mask":
        mb.is_weights = sequence_mask_weights(stats.raw, mb.rollout_logp, mb.mask, algo.tis_cap)
        sums["tis_masked_sequences"] += float((mb.is_weights[:, 0] == 0).sum())
    else:
        mb.is_weights = tis_weights(stats.raw, mb.rollout_logp, algo.tis_cap)
    sums["tis_weight_mean"] += float(mb.is_weights[m].sum())


def train_on_batch(lm, optimizer, mbs: list[MicroBatch], algo, max_grad_norm: float, temperature: float,
                   max_len: int, autocast, logits_chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """`algo.epochs` optimiser steps over the micro-batches; returns the step's metrics.

    `algo` is the recipe's AlgorithmConfig; `max_len` the Dr.GRPO normaliser
    (rollout.max_tokens); `autocast` a callable giving the compute-dtype context.
    Token-level metrics (kl, entropy, clip fractions, ratio_mean) are means over
    every loss token of every epoch; the mismatch and importance weights are epoch
    0's, over every completion token; train/padded_fraction is the share of decoder
    positions that were padding.
    """
    masks = [mask_truncated(mb.mask, mb.truncated) if algo.mask_truncated else mb.mask for mb in mbs]  # [n, T]
    tokens = int(sum(m.sum() for m in masks))
    seqs = sum(mb.mask.shape[0] for mb in mbs)
    completion_tokens = int(sum(mb.mask.sum() for mb in mbs))
    params = [p for p in lm.parameters() if p.requires_grad]
    first: dict[str, float] = defaultdict(float)  # epoch 0: sums over tokens, and the max gap
    per_token: dict[str, float] = defaultdict(float)  # token-weighted sums over all epochs
    out: dict[str, float] = defaultdict(float)
    for epoch in range(algo.epochs):
        optimizer.zero_grad(set_to_none=True)
        for mb, mask in zip(mbs, masks):
            with autocast():
                stats = completion_logprobs(lm, mb, temperature, logits_chunk, entropy=True,
                                            entropy_grad=algo.entropy_gamma > 0, raw=epoch == 0)  # [n, T] each
            if epoch == 0:
                _first_pass(mb, stats, algo, first)
            loss, m = grpo_loss(
                stats.logp, mb.old_logp, mb.advantages, mask, ref_logp=mb.ref_logp, entropy=stats.entropy,
                beta=algo.kl_beta, gamma=algo.entropy_gamma, kl_kind=algo.kl_type, clip_low=algo.clip_low,
                clip_high=algo.clip_high, is_weights=mb.is_weights, mode=algo.loss_agg, max_len=max_len,
                ratio_level=algo.ratio_level)
            # this micro-batch's share of the whole-batch loss: of its tokens for token-mean, else of its rows
            share = float(mask.sum()) / max(tokens, 1) if algo.loss_agg == "token-mean" else mask.shape[0] / seqs
            (loss * share).backward()
            out["loss"] += m.pop("loss") * share / algo.epochs
            out["policy_loss"] += m.pop("policy_loss") * share / algo.epochs
            out["ratio_max"] = max(out["ratio_max"], m.pop("ratio_max"))
            for k, v in m.items():
                per_token[k] += v * float(mask.sum())
        out["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) / algo.epochs
        optimizer.step()
    out.update({k: v / max(tokens * algo.epochs, 1) for k, v in per_token.items()})
    masked = first.pop("tis_masked_sequences", None)
    out.update({k: v if k.endswith("_max") else v / max(completion_tokens, 1) for k, v in first.items()})
    if masked is not None:
        out["tis_masked_fraction"] = masked / max(seqs, 1)
    pads = [padding(mb, getattr(lm, "is_gradient_checkpointing", False)) for mb in mbs]
    out["train/padded_fraction"] = sum(p for p, _ in pads) / max(sum(n for _, n in pads), 1)
    out["train_tokens"], out["train_sequences"] = tokens, seqs
    out["train/micro_batches"] = len(mbs)
    return dict(out)
