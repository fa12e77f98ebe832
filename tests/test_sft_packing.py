"""Packing, mixtures and collation (distill/batches.py) and the shared token forward."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from distill.batches import (DataConfig, Example, SourceConfig, collate_packed, held_out, load_datasets,
                             mixture_order, pack, plan_steps, shard)
from distill.sft import TokenLogProbs, sft_loss
from reason.chat import IGNORE_INDEX, ChatConfig, prepare_tokenizer
from tests.tiny import tiny_model, tiny_tokenizer, write_traces

CHAT = ChatConfig(system_prompt=None)


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer(tiny_tokenizer(), CHAT)


@pytest.fixture(scope="module")
def data(tokenizer, tmp_path_factory):
    path = write_traces(tmp_path_factory.mktemp("packing") / "traces.jsonl", 12, (1, 2, 3))
    cfg = DataConfig(train=[SourceConfig(path=path)], max_len=1024, eval_fraction=0.0)
    train, _ = load_datasets(cfg, tokenizer, CHAT, "sft")
    return train


def _loss_sum(module, rows, pad_id):
    batch = collate_packed(rows, [[0] * len(r) for r in rows], pad_id)
    loss, sums = sft_loss(module, batch, 1)
    return loss, sums["tokens"].sum().item()


def _attention_implementations() -> list[str]:
    """Every implementation the config accepts that runs on this machine (flash-attention needs a GPU)."""
    impls = ["sdpa", "eager", "flex_attention"]
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            impls.append("flash_attention_2")
        except ImportError:
            pass
    return impls


@pytest.mark.parametrize("impl", _attention_implementations())
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_packed_loss_equals_one_by_one(arch, impl, tokenizer, data):
    """Several rows per micro-batch, several sequences per row, with every attention implementation:
    packed sequences never see each other."""
    model = tiny_model(arch, tokenizer).eval()
    model.set_attn_implementation(impl)
    module = TokenLogProbs(model)
    items = data.items[:9]
    with torch.no_grad():
        packed, n_packed = _loss_sum(module, [items[0:4], items[4:7], items[7:9]], tokenizer.pad_token_id)
        alone = [_loss_sum(module, [[it]], tokenizer.pad_token_id) for it in items]
    n_alone = sum(n for _, n in alone)
    assert n_packed == n_alone > 0
    assert abs(packed.item() / n_packed - sum(l.item() for l, _ in alone) / n_alone) < 1e-5


def test_rows_laid_end_to_end_give_the_same_loss(tokenizer, data):
    """The flash-attention layout (a micro-batch as one row) computes what the row layout computes."""
    model = tiny_model("llama", tokenizer).eval()
    rows = [data.items[0:4], data.items[4:7], data.items[7:9]]
    with torch.no_grad():
        rowwise, n = _loss_sum(TokenLogProbs(model, one_row=False), rows, tokenizer.pad_token_id)
        flat, m = _loss_sum(TokenLogProbs(model, one_row=True), rows, tokenizer.pad_token_id)
    assert n == m and abs(rowwise.item() - flat.item()) / n < 1e-5


def test_token_loss_matches_transformers_own_loss(tokenizer, data):
    """Our shifted targets and masked head give exactly the HF causal-LM loss."""
    model = tiny_model("llama", tokenizer).eval()
    ex = data.items[0][0]
    with torch.no_grad():
        ours, n = _loss_sum(TokenLogProbs(model), [[data.items[0]]], tokenizer.pad_token_id)
        theirs = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
    assert abs(ours.item() / n - theirs.item()) < 1e-5


def test_collate_restarts_positions_and_never_crosses_sequences():
    a = Example([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = Example([4, 5], [IGNORE_INDEX, 5])
    batch = collate_packed([[(a,), (b,)], [(b,)]], [[0, 1], [1]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # the last token of a sequence predicts nothing (not the next sequence's first token)
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX], [5] + [IGNORE_INDEX] * 4]
    assert batch.seq_ids.tolist() == [[0, 0, -1, 1, -1], [2, -1, -1, -1, -1]]
    assert batch.seq_sources.tolist() == [0, 1, 1]


def test_pack_fills_rows_without_overflow():
    lengths = [5, 3, 7, 2, 9, 1, 4, 6]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[0, 1, 3], [2, 5], [4], [6, 7]]  # first fit, in order
    with pytest.raises(ValueError, match="more than max_len"):
        pack([11], 10)


def test_mixture_weights_repeat_and_subsample():
    sources = [0] * 10 + [1] * 20
    order = mixture_order(sources, [2.0, 0.5], seed=0, epoch=0)
    per_source = Counter(sources[i] for i in order)
    assert per_source == {0: 20, 1: 10}
    assert all(n == 2 for i, n in Counter(order).items() if sources[i] == 0)
    again = mixture_order(sources, [2.0, 0.5], seed=0, epoch=0)
    other_epoch = mixture_order(sources, [2.0, 0.5], seed=0, epoch=1)
    assert again == order and other_epoch != order


def test_plan_is_deterministic_and_drops_partial_steps(data):
    cfg = DataConfig(train=[SourceConfig(path="unused.jsonl")], max_len=1024, packing=False)
    steps = plan_steps(data, cfg, epochs=2, batch_rows=5)
    assert len(steps) == 2 * (len(data.items) // 5)
    assert all(len(s) == 5 for s in steps)
    assert steps == plan_steps(data, cfg, epochs=2, batch_rows=5)


def test_shard_deals_every_row_once():
    rows = [[0], [1], [2], [3], [4], [5]]
    lengths = [10, 60, 30, 50, 20, 40]
    parts = [shard(rows, lengths, r, world=2, micro=2) for r in range(2)]
    dealt = sorted(row for p in parts for mb in p for row in mb)
    assert dealt == sorted(rows)
    assert parts[0] == [[[1], [5]], [[4]]] and parts[1] == [[[3], [2]], [[0]]]


def test_held_out_is_stable_and_near_fraction():
    ids = [f"p{i}" for i in range(2000)]
    picked = [held_out(i, 0.1, seed=3) for i in ids]
    assert picked == [held_out(i, 0.1, seed=3) for i in ids]
    assert 150 < sum(picked) < 250


def test_overlong_examples_are_dropped_and_counted(tokenizer, tmp_path):
    path = write_traces(tmp_path / "traces.jsonl", 20, (1, 2, 3, 4, 5))
    cfg = DataConfig(train=[SourceConfig(path=path)], max_len=240, eval_fraction=0.0)
    train, _ = load_datasets(cfg, tokenizer, CHAT, "sft")
    assert train.dropped.get("too_long", 0) > 0
    assert len(train.items) + train.dropped["too_long"] == 20
    assert max(train.lengths()) <= 240
