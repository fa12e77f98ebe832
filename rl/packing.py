"""Rows to micro-batches for the GRPO update: a fixed row count, padded, or a token budget, packed.

`train.micro_batch` rows per forward (the default) pads prompts on the left and
completions on the right; `train.micro_batch_tokens` fills each micro-batch up to a
token budget instead (verl's use_dynamic_bsz) and lays it out as one packed sequence,
so no padded position reaches the decoder or the LM head. In both, the rows of one
prompt (a GRPO group) share one prompt forward: padded, through a KV cache repeated
to its rows (rl.step); packed, as one copy of the prompt that each of its completions
attends to and no other completion does (`shared_prompt_mask`; with sdpa,
`shared_prompt_attention` computes the same attention segment by segment, so its cost
grows with the micro-batch's length, not its square). The loss reads the [n, T] grids
of either layout alike, so the gradient is the same either way.
`padding` counts the decoder positions that are padding, for `train/padded_fraction`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from reason.errors import UserError


@dataclass
class Row:
    """One sequence to train on: its prompt, completion, and what the loss needs of it."""

    prompt_ids: list[int]
    ids: list[int]  # completion tokens
    rollout_logprobs: list[float]  # the engine's, raw (temperature 1)
    advantage: float = 0.0
    ref_logprobs: torch.Tensor | None = None  # [T] at the sampling temperature
    truncated: bool = False  # the engine stopped it at rollout.max_tokens (finish_reason "length")


@dataclass
class Packed:
    """A micro-batch laid end to end as one sequence of L positions: each distinct prompt once, followed by
    the completions of its rows. Completion token j of a row sits at position id len(prompt) + j."""

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    prompt_index: torch.Tensor  # [L] which distinct prompt each position belongs to
    row_index: torch.Tensor  # [L] the row of a completion position, -1 on prompt positions
    last_prompt: torch.Tensor  # [u] position of each prompt's last token: it predicts completion token 0
    inner: torch.Tensor  # [N - n'] positions of completion tokens 0..T_r-2 of every row, in row order
    segments: list  # per prompt: (start, end, [(start, end) of each non-empty completion]), for sdpa


@dataclass
class MicroBatch:
    """Rows for one forward. Consecutive rows with the same prompt (a GRPO group) share its forward: `prompts`
    holds it once, `prompt_of` maps rows to it. `packed` is set in token-budget mode."""

    prompts: torch.Tensor  # [u, P] distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [u, P]
    prompt_of: torch.Tensor  # [n] row -> its prompt's index in `prompts`, non-decreasing
    targets: torch.Tensor  # [n, T] completion ids, right-padded (pad where masked)
    mask: torch.Tensor  # [n, T] 1 on completion tokens
    rollout_logp: torch.Tensor  # [n, T]
    advantages: torch.Tensor  # [n]
    ref_logp: torch.Tensor | None  # [n, T]
    truncated: torch.Tensor | None = None  # [n] bool
    packed: Packed | None = None
    old_logp: torch.Tensor | None = None  # [n, T], set by epoch 0
    is_weights: torch.Tensor | None = None  # [n, T], set by epoch 0


def _pad(rows: list[list], width: int, value, left: bool = False) -> torch.Tensor:
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r)))
                         for r in rows])


def pack_rows(rows: list[Row], starts: list[bool]) -> Packed:
    """The packed layout of rows whose prompts start a new group where `starts` is True."""
    ids, pos, prompt_index, row_index, last, inner, segments = [], [], [], [], [], [], []
    for r, (row, new) in enumerate(zip(rows, starts)):
        if new:
            p = len(row.prompt_ids)
            segments.append((len(ids), len(ids) + p, []))
            ids += row.prompt_ids
            pos += range(p)
            prompt_index += [len(last)] * p
            row_index += [-1] * p
            last.append(len(ids) - 1)
        start = len(ids)
        ids += row.ids
        pos += range(p, p + len(row.ids))
        prompt_index += [len(last) - 1] * len(row.ids)
        row_index += [r] * len(row.ids)
        inner += range(start, start + len(row.ids) - 1)
        if row.ids:
            segments[-1][2].append((start, len(ids)))
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Packed(long([ids]), long([pos]), long(prompt_index), long(row_index), long(last), long(inner), segments)


def collate_groups(rows: list[Row], pad_id: int, device: torch.device, packed: bool = False) -> MicroBatch:
    starts = [i == 0 or r.prompt_ids != rows[i - 1].prompt_ids for i, r in enumerate(rows)]  # a new prompt
    distinct = [r.prompt_ids for r, new in zip(rows, starts) if new]
    p = max(len(x) for x in distinct)
    t = max(len(r.ids) for r in rows)
    ref = None
    if rows[0].ref_logprobs is not None:
        ref = torch.stack([torch.nn.functional.pad(r.ref_logprobs, (0, t - len(r.ids))) for r in rows])
    to = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    layout = Packed(*(to(x) for x in vars(pack_rows(rows, starts)).values())) if packed else None
    return MicroBatch(
        prompts=to(_pad(distinct, p, pad_id, left=True)),
        prompt_mask=to(_pad([[1] * len(x) for x in distinct], p, 0, left=True)),
        prompt_of=to(torch.tensor(starts).cumsum(0) - 1),
        targets=to(_pad([r.ids for r in rows], t, pad_id)), mask=to(_pad([[1] * len(r.ids) for r in rows], t, 0)),
        rollout_logp=to(_pad([r.rollout_logprobs for r in rows], t, 0.0).float()),
        advantages=to(torch.tensor([r.advantage for r in rows], dtype=torch.float32)), ref_logp=to(ref),
        truncated=to(torch.tensor([r.truncated for r in rows], dtype=torch.bool)), packed=layout)


def _order(rows: list[Row]) -> list[int]:
    """A prompt's rows together (they share its forward), shorter prompts and completions first (less padding)."""
    return sorted(range(len(rows)), key=lambda i: (len(rows[i].prompt_ids), rows[i].prompt_ids, len(rows[i].ids), i))


def token_chunks(rows: list[Row], budget: int) -> list[list[int]]:
    """Row indices cut into micro-batches of at most `budget` packed positions (a shared prompt counts once),
    filled in order. A row that does not fit an empty micro-batch is refused by the key that sets the budget."""
    chunks: list[list[int]] = []
    used = budget + 1  # forces a first micro-batch
    for i in _order(rows):
        row = rows[i]
        alone = len(row.prompt_ids) + len(row.ids)
        if alone > budget:
            raise UserError(f"train.micro_batch_tokens {budget} is smaller than a row of {alone} tokens "
                            f"({len(row.prompt_ids)} prompt + {len(row.ids)} completion); raise it to at least "
                            "rollout.max_prompt_tokens + rollout.max_tokens")
        shared = bool(chunks) and rows[chunks[-1][-1]].prompt_ids == row.prompt_ids
        cost = len(row.ids) if shared else alone
        if used + cost > budget:
            chunks.append([])
            used, cost = 0, alone
        chunks[-1].append(i)
        used += cost
    return chunks


def plan(rows: list[Row], size: int, tokens: int | None) -> list[list[int]]:
    """Micro-batches of row indices: by token budget when `tokens` is set, else `size` rows each."""
    if tokens is not None:
        return token_chunks(rows, tokens)
    order = _order(rows)
    return [order[k:k + size] for k in range(0, len(order), size)]


def micro_batches(rows: list[Row], size: int, pad_id: int, device: torch.device,
                  tokens: int | None = None) -> list[MicroBatch]:
    return [collate_groups([rows[i] for i in chunk], pad_id, device, packed=tokens is not None)
            for chunk in plan(rows, size, tokens)]


def padding(mb: MicroBatch, per_row: bool) -> tuple[int, int]:
    """(padded positions, all positions) the decoder runs on for this micro-batch.

    Padded: the prompt forward [u, P] and the completion forward [n, T]; `per_row`
    (gradient checkpointing, where HF keeps no cache) one [n, P+T] forward instead.
    Packed: no padding at all.
    """
    if mb.packed is not None:
        return 0, mb.packed.input_ids.shape[1]
    real_prompts = mb.prompt_mask.sum(1)  # [u]
    completions = int(mb.mask.sum())
    n, t = mb.mask.shape
    p = mb.prompts.shape[1]
    if per_row:
        total, real = n * (p + t), int(real_prompts[mb.prompt_of].sum()) + completions
    else:
        total, real = mb.prompts.numel() + n * t, int(real_prompts.sum()) + completions
    return total - real, total


def shared_prompt_mask(packed: Packed, attn_implementation: str):
    """The attention mask of a packed micro-batch, in the form `attn_implementation` takes.

    Position q attends to kv when kv <= q, both belong to the same prompt, and kv is a
    prompt position or in q's own completion: each completion sees its prompt and
    itself, never a sibling. transformers passes a 4-D mask through unchanged (a
    boolean tensor for sdpa, an additive float one for eager, a BlockMask for flex).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if attn_implementation not in ("sdpa", "eager", "flex_attention"):
        raise UserError(f"train.micro_batch_tokens needs a custom attention mask, which {attn_implementation} "
                        "cannot take; use model.attn_implementation sdpa, eager or flex_attention")
    group, row = packed.prompt_index, packed.row_index

    def allowed(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (group[q_idx] == group[kv_idx]) & ((row[kv_idx] < 0) | (row[kv_idx] == row[q_idx]))

    n = group.shape[0]
    extra = {"dtype": torch.float32} if attn_implementation == "eager" else {}
    return ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation](
        batch_size=1, q_length=n, kv_length=n, mask_function=allowed, allow_is_causal_skip=False,
        device=group.device, **extra)


SHARED_PROMPT = "reason_shared_prompt"  # the attention implementation name `shared_prompt_attention` is registered under


def shared_prompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            shared_prompt=None, **kwargs):
    """transformers' attention interface for a packed micro-batch: query [1, H, L, D], key/value [1, H_kv, L, D]
    -> [1, L, H, D]. Exactly the attention of `shared_prompt_mask`, one sdpa call per prompt (causal) and per
    completion (its prompt and itself, causal from the bottom right), so no [L, L] mask exists.
    `shared_prompt` is `Packed.segments`."""
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # sdpa's own autocast cast: the causal-bias dispatch checks dtypes first
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs = []
    for a, b, rows in shared_prompt:
        outs.append(sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, is_causal=True,
                         scale=scaling))
        for c, e in rows:
            k = torch.cat([key[:, :, a:b], key[:, :, c:e]], dim=2)  # [1, H, P + t, D]
            v = torch.cat([value[:, :, a:b], value[:, :, c:e]], dim=2)
            outs.append(sdpa(query[:, :, c:e], k, v, attn_mask=causal_lower_right(e - c, b - a + e - c),
                             dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


# No mask function under this name: transformers then builds no mask, and the segments are the mask.
AttentionInterface.register(SHARED_PROMPT, shared_prompt_attention)
