"""Training data for SFT and DPO: records -> token examples -> packed rows -> tensors.

Paper knobs (arXiv 2504.21318 and 2504.21233; docs/recipes.md §1, §3):
- `data.packing`: several examples share one row of up to `max_len` tokens
  (Phi-4-mini stage 1), or one example per row (stage 2: "the model must learn
  when to stop"). Packed examples never see each other: every example restarts
  its position ids at 0, and transformers then builds a block-diagonal causal mask
  (sdpa / eager; flash-attention reads the same position ids).
- `data.train[].weight`: data mixtures with one weight per source (Phi-4-reasoning
  tuned domain mixtures separately and added them up). A weight of 2 shows each
  example twice per epoch; 0.5 shows a fresh random half each epoch.
- Over-long examples are dropped and counted, never truncated: a truncated
  response has lost its EOS, the signal that teaches the model to stop.

An item is the unit that stays whole in one row: one example for SFT, the
(chosen, rejected) pair for DPO. A DPO source holds whole-response pairs
(`PreferencePair`) or Pivotal Token Search's single-token pairs (`TokenPair`, Phi-4
arXiv 2412.08905 section 4.3): there both sequences are the shared prompt + prefix ids
and one token, the only one with a label. Sources of both kinds mix like any others.
The whole plan (which items form which row of which step) is a pure function of the
data and the seed, so a resumed run finds its data position from the step number alone.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch

from reason.chat import IGNORE_INDEX, ChatConfig, format_response, tokenize_example
from reason.config import Section
from reason.errors import UserError
from reason.records import RecordError, Trace, existing, read_jsonl, read_numbered


class SourceConfig(Section):
    path: str  # Trace JSONL (SFT, from `reason distill generate`/`filter`); DPO: PreferencePair or TokenPair JSONL
    weight: float = 1.0  # copies per epoch; fractions take a fresh random subset each epoch
    name: str | None = None  # label in per-source metrics; default: the file stem


class DataConfig(Section):
    train: list[SourceConfig]
    eval: list[SourceConfig] = []  # held-out files; when empty, eval_fraction of train problems
    eval_fraction: float = 0.02  # by problem id, so no problem is in both splits
    max_len: int = 4096  # longest sequence; a row holds max_len tokens per sequence of an item
    packing: bool = True
    seed: int = 0


class Example(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; aligned with input_ids (not shifted)


Item = tuple[Example, ...]  # SFT: (example,); DPO: (chosen, rejected)


@dataclass
class Dataset:
    items: list[Item]
    sources: list[int]  # source index of each item
    names: list[str]  # source names, by index
    weights: list[float]
    pad_id: int = 0
    seqs_per_item: int = 1  # 2 for DPO pairs: a row has room for both
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def lengths(self) -> list[int]:
        return [sum(len(ex.input_ids) for ex in item) for item in self.items]


def target_count(item: Item) -> int:
    """Tokens that carry loss: labels after the first position (they are predicted)."""
    return sum(sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in item)


# ---------------------------------------------------------------- records -> items

def _example(tokenizer, prompt, response: str, chat: ChatConfig) -> Example:
    out = tokenize_example(tokenizer, prompt, response, chat)
    return Example(out["input_ids"], out["labels"])


def trace_item(trace: Trace, tokenizer, chat: ChatConfig) -> Item:
    return (_example(tokenizer, trace.problem.prompt, format_response(trace.reasoning, trace.answer, chat), chat),)


def pair_item(pair, tokenizer, chat: ChatConfig) -> Item:
    from distill.pairs import TokenPair

    if isinstance(pair, TokenPair):  # ids as the sampling model saw them: nothing is re-tokenised
        context = pair.prompt_ids + pair.prefix_ids
        mask = [IGNORE_INDEX] * len(context)
        return (Example(context + [pair.chosen_id], mask + [pair.chosen_id]),
                Example(context + [pair.rejected_id], mask + [pair.rejected_id]))
    prompt = pair.problem.prompt
    return (_example(tokenizer, prompt, pair.chosen, chat), _example(tokenizer, prompt, pair.rejected, chat))


def check_token_pair(pair, tokenizer, path: Path, line: int) -> None:
    """A TokenPair's ids must be this tokenizer's: in its vocabulary, and decoding to the pair's texts."""
    size = len(tokenizer)
    bad = [t for t in (*pair.prompt_ids, *pair.prefix_ids, pair.chosen_id, pair.rejected_id) if not 0 <= t < size]
    if bad:
        raise RecordError(path, line, f"token id {bad[0]} is outside this tokenizer's {size} tokens: the pair was "
                                      "made with another model's tokenizer")
    if pair.chosen_id == pair.rejected_id:
        raise RecordError(path, line, f"chosen_id and rejected_id are both {pair.chosen_id}")
    for name, token, text in (("chosen", pair.chosen_id, pair.chosen), ("rejected", pair.rejected_id, pair.rejected)):
        got = tokenizer.decode([token], skip_special_tokens=False)
        if got != text:
            raise RecordError(path, line, f"{name}_id {token} decodes to {got!r} with this tokenizer, not {text!r}: "
                                          "the pair was made with another model's tokenizer")


def read_records(src: SourceConfig, kind: Literal["sft", "dpo"], key: str, tokenizer) -> list:
    """A source's records: traces (SFT); whole-response or single-token pairs (DPO; the first record says which)."""
    path = existing(src.path, key)
    if kind == "sft":
        return list(read_jsonl(path, Trace))
    from distill.pairs import PreferencePair, TokenPair

    first = next(read_jsonl(path), None)
    model = TokenPair if first is not None and "chosen_id" in first else PreferencePair
    out = []
    for line, rec in read_numbered(path, model):
        if model is TokenPair:
            check_token_pair(rec, tokenizer, path, line)
        out.append(rec)
    return out


def problem_id(rec) -> str:
    """The problem a record belongs to: what splits train from eval (a TokenPair names it by id)."""
    return rec.problem_id if hasattr(rec, "problem_id") else rec.problem.id


def held_out(problem_id: str, fraction: float, seed: int) -> bool:
    """A stable coin flip per problem id: same answer in every process and run."""
    digest = hashlib.sha1(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _source_name(src: SourceConfig) -> str:
    return src.name or Path(src.path).stem


def load_datasets(cfg: DataConfig, tokenizer, chat: ChatConfig,
                  kind: Literal["sft", "dpo"]) -> tuple[Dataset, Dataset]:
    """Tokenise every source into a train and an eval Dataset (per-source names kept)."""
    to_item: Callable = trace_item if kind == "sft" else pair_item
    pad, seqs = tokenizer.pad_token_id, 1 if kind == "sft" else 2
    train = Dataset([], [], [_source_name(s) for s in cfg.train], [s.weight for s in cfg.train], pad, seqs)
    held_srcs = cfg.eval or cfg.train
    held = Dataset([], [], [_source_name(s) for s in held_srcs], [1.0] * len(held_srcs), pad, seqs)
    plan = [(k, s, train, not cfg.eval, f"data.train.{k}.path") for k, s in enumerate(cfg.train)]
    plan += [(k, s, held, False, f"data.eval.{k}.path") for k, s in enumerate(cfg.eval)]
    for k, src, into, split, key in plan:
        for rec in read_records(src, kind, key, tokenizer):
            target = held if split and held_out(problem_id(rec), cfg.eval_fraction, cfg.seed) else into
            item = to_item(rec, tokenizer, chat)
            if max(len(ex.input_ids) for ex in item) > cfg.max_len:
                target.dropped["too_long"] = target.dropped.get("too_long", 0) + 1
                continue
            target.items.append(item)
            target.sources.append(k)
    if not train.items:
        raise UserError(f"data.train: no training examples left (dropped: {train.dropped}); raise data.max_len?")
    return train, held


# ---------------------------------------------------------------- order, packing, steps

def mixture_order(sources: list[int], weights: list[float], seed: int, epoch: int) -> list[int]:
    """Item indices for one epoch: each source repeated by its weight, then shuffled."""
    rng = random.Random(f"{seed}:{epoch}")
    by_source: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    order = []
    for s, idx in sorted(by_source.items()):
        whole, frac = divmod(weights[s], 1.0)
        order += idx * int(whole) + rng.sample(idx, round(frac * len(idx)))
    rng.shuffle(order)
    return order


def pack(lengths: list[int], max_len: int, window: int = 64) -> list[list[int]]:
    """First-fit packing in the given order: indices into `lengths`, grouped in rows.

    Only the last `window` open rows are searched, so cost stays linear in the data.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"item {i} has {n} tokens, more than max_len {max_len}")
        start = max(0, len(rows) - window)
        for r in range(start, len(rows)):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_len - n)
    return rows


def item_rows(ds: Dataset, cfg: DataConfig, order: list[int]) -> list[list[int]]:
    """The items of `order` in rows: packed first-fit (`data.packing`), or one per row."""
    if not cfg.packing:
        return [[i] for i in order]
    lengths = ds.lengths()
    return [[order[j] for j in row] for row in pack([lengths[i] for i in order], cfg.max_len * ds.seqs_per_item)]


def plan_steps(ds: Dataset, cfg: DataConfig, epochs: int, batch_rows: int) -> list[list[list[int]]]:
    """Steps -> rows -> item indices, for `epochs` passes; an epoch's last partial step is dropped."""
    steps = []
    for epoch in range(epochs):
        rows = item_rows(ds, cfg, mixture_order(ds.sources, ds.weights, cfg.seed, epoch))
        steps += [rows[k:k + batch_rows] for k in range(0, len(rows) - batch_rows + 1, batch_rows)]
    return steps


def shard(rows: list[list[int]], lengths: list[int], rank: int, world: int, micro: int) -> list[list[list[int]]]:
    """This rank's micro-batches of one step. Rows are sorted by length and dealt
    round-robin, so ranks get similar work and micro-batches similar padding."""
    ranked = sorted(rows, key=lambda r: -sum(lengths[i] for i in r))[rank::world]
    return [ranked[k:k + micro] for k in range(0, len(ranked), micro)]


# ---------------------------------------------------------------- tensors

class Batch(NamedTuple):
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], restarting at 0 for every sequence
    targets: torch.Tensor  # [B, T] next token of the same sequence, IGNORE_INDEX where no loss
    seq_ids: torch.Tensor  # [B, T] sequence number within the batch at target tokens, else -1
    seq_sources: torch.Tensor  # [S] source index of each sequence

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self))


def collate_packed(rows: list[list[Item]], row_sources: list[list[int]], pad_id: int) -> Batch:
    """Right-pad rows of items into one Batch. The padding tail is its own sequence
    (positions from 0, no targets), so no attention mask is needed."""
    width = max(sum(len(ex.input_ids) for item in row for ex in item) for row in rows)
    ids, pos, tgt, sid, srcs = [], [], [], [], []
    for row, sources in zip(rows, row_sources):
        r_ids, r_pos, r_tgt, r_sid = [], [], [], []
        for item, source in zip(row, sources):
            for ex in item:
                n = len(ex.input_ids)
                shifted = ex.labels[1:] + [IGNORE_INDEX]  # predict the next token of this sequence only
                r_ids += ex.input_ids
                r_pos += range(n)
                r_tgt += shifted
                r_sid += [len(srcs) if t != IGNORE_INDEX else -1 for t in shifted]
                srcs.append(source)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        tgt.append(r_tgt + [IGNORE_INDEX] * pad)
        sid.append(r_sid + [-1] * pad)
    return Batch(*(torch.tensor(x, dtype=torch.long) for x in (ids, pos, tgt, sid, srcs)))


def batch_of(ds: Dataset, rows: list[list[int]]) -> Batch:
    items = [[ds.items[i] for i in r] for r in rows]
    return collate_packed(items, [[ds.sources[i] for i in r] for r in rows], ds.pad_id)
