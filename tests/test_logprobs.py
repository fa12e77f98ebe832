"""reason.logprobs.head_logprobs: the LM head a chunk at a time, with the values and gradients of the full logits.

The references are independent: log_softmax / cross-entropy of the whole [N, V] logits, as
SFT, DPO and GRPO computed them before the head was chunked.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.batches import DataConfig, SourceConfig, batch_of, load_datasets
from distill.dpo import dpo_objective
from distill.sft import TokenLogProbs, sft_loss
from reason.chat import IGNORE_INDEX, ChatConfig, prepare_tokenizer
from reason.logprobs import head_logprobs
from tests.tiny import tiny_model, tiny_tokenizer, write_pairs, write_traces

CHAT = ChatConfig(system_prompt=None)


class CountingHead(torch.nn.Module):
    """A linear head that records how many positions each call (forward or recompute) saw, and its output dtype."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head, self.calls, self.dtypes = head, [], []

    def forward(self, x):
        self.calls.append(x.shape[0])
        out = self.head(x)
        self.dtypes.append(out.dtype)
        return out


def _grads(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_values_and_gradients_equal_the_full_logits(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 23, 16, 40
    head = torch.nn.Linear(h, v, bias=True)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (n,), generator=g)
    wl, we = torch.randn(n, generator=g), torch.randn(n, generator=g)  # arbitrary upstream gradients

    def run(fn):
        for p in (hidden, *head.parameters()):
            p.grad = None
        logp, ent, raw = fn()
        (wl * logp + we * ent).sum().backward()
        return logp.detach(), ent.detach(), raw, _grads([hidden, *head.parameters()])

    def full():
        logits = head(hidden) / temperature  # [N, V]
        p = logits.log_softmax(-1)
        return p.gather(-1, ids[:, None])[:, 0], -(p.exp() * p).sum(-1), head(hidden).log_softmax(-1).gather(
            -1, ids[:, None])[:, 0].detach()

    want = run(full)
    for c in (chunk, 0):
        got = run(lambda: head_logprobs(head, hidden, ids, temperature, chunk=c, entropy=True, raw=True))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not got[2].requires_grad


def test_a_metric_entropy_and_the_raw_logprobs_carry_no_graph():
    g = torch.Generator().manual_seed(0)
    head, hidden = torch.nn.Linear(6, 20), torch.randn(11, 6, generator=g, requires_grad=True)
    ids = torch.randint(0, 20, (11,), generator=g)
    out = head_logprobs(head, hidden, ids, chunk=4, entropy=True, raw=True, entropy_grad=False)
    assert out.logp.requires_grad and not out.entropy.requires_grad and not out.raw.requires_grad
    out.logp.sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    head_logprobs(head, hidden, ids, chunk=0).logp.sum().backward()
    torch.testing.assert_close(got, hidden.grad, rtol=0, atol=1e-6)


def test_bf16_autocast_is_replayed_when_the_backward_recomputes_the_logits():
    g = torch.Generator().manual_seed(0)
    head = CountingHead(torch.nn.Linear(16, 40))
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 40, (23,), generator=g)
    results = []
    for c in (5, 0):
        hidden.grad, head.head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head_logprobs(head, hidden, ids, chunk=c, entropy=True)
        (out.logp.sum() + out.entropy.sum()).backward()
        results.append((out.logp.detach(), hidden.grad.clone(), head.head.weight.grad.clone()))
    assert head.dtypes == [torch.bfloat16] * 11  # 5 chunks forward, 5 recomputed, 1 whole
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)  # the same bf16 logits
    for a, b in zip(results[0][1:], results[1][1:]):  # a bf16 gradient: the last bit may round either way
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_the_head_never_sees_more_than_a_chunk_forward_or_backward():
    head = CountingHead(torch.nn.Linear(8, 30))
    hidden = torch.randn(50, 8, requires_grad=True)
    out = head_logprobs(head, hidden, torch.randint(0, 30, (50,)), chunk=16, entropy=True)
    (out.logp.sum() + out.entropy.sum()).backward()
    assert max(head.calls) == 16 and sum(head.calls) == 2 * 50  # each chunk once forward, once recomputed
    assert hidden.grad.abs().sum() > 0
    head.calls.clear()
    with torch.no_grad():
        head_logprobs(head, hidden, torch.randint(0, 30, (50,)), chunk=16)
    assert head.calls == [16, 16, 16, 2]


def test_no_positions_give_empty_results():
    out = head_logprobs(torch.nn.Linear(4, 6), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), entropy=True)
    assert out.logp.shape == out.entropy.shape == (0,) and out.raw is None


# ---------------------------------------------------------------- SFT and DPO through TokenLogProbs

@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer(tiny_tokenizer(), CHAT)


def _old_token_logprobs(lm, batch):
    """The pre-chunking TokenLogProbs forward: cross-entropy of every target's logits at once."""
    hidden = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              use_cache=False).last_hidden_state  # [B, T, H]
    keep = batch.targets != IGNORE_INDEX
    return -F.cross_entropy(lm.get_output_embeddings()(hidden[keep]).float(), batch.targets[keep], reduction="none")


def test_sft_loss_and_gradients_equal_the_full_logits_path(tokenizer, tmp_path):
    cfg = DataConfig(train=[SourceConfig(path=write_traces(tmp_path / "t.jsonl", 6, (1, 2)))], max_len=1024,
                     eval_fraction=0.0)
    train, _ = load_datasets(cfg, tokenizer, CHAT, "sft")
    batch = batch_of(train, [[0, 1, 2], [3, 4], [5]])  # packed rows, right padding
    lm = tiny_model("llama", tokenizer)
    module = TokenLogProbs(lm, chunk=7)
    head = CountingHead(lm.lm_head)
    lm.lm_head = head
    loss, sums = sft_loss(module, batch, 1)
    loss = loss / sums["tokens"].sum()  # the trainer's normalisation: the mean over target tokens
    loss.backward()
    got = _grads(lm.parameters())
    assert max(head.calls) == 7
    lm.zero_grad()
    want = -_old_token_logprobs(lm, batch).mean()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5
    torch.testing.assert_close(got, _grads(lm.parameters()), rtol=0, atol=1e-5)


def test_dpo_loss_and_gradients_equal_the_full_logits_path(tokenizer, tmp_path):
    cfg = DataConfig(train=[SourceConfig(path=write_pairs(tmp_path / "p.jsonl", 4))], max_len=512, eval_fraction=0.0)
    train, _ = load_datasets(cfg, tokenizer, CHAT, "dpo")
    batch = batch_of(train, [[0, 1], [2, 3]])
    # float64: a margin sums hundreds of token log-probs, so float32 rounding alone (log_softmax against
    # x - logsumexp) moves it by ~2e-5; in float64 the two paths must agree to rounding of the sum.
    lm, ref = tiny_model("qwen2", tokenizer, seed=1).double(), tiny_model("qwen2", tokenizer, seed=2).double()
    results = []
    for chunk in (64, 0):
        lm.zero_grad()
        loss, sums = dpo_objective(TokenLogProbs(ref, chunk=chunk), beta=0.5).loss(TokenLogProbs(lm, chunk=chunk),
                                                                                   batch, 1)
        loss = loss / sums["pairs"]  # the trainer's normalisation: the mean over pairs
        loss.backward()
        results.append((loss.detach(), sums["margin"], _grads(lm.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert results[0][2].abs().sum() > 0
