"""rl.step and the trainer's pure parts: padding, micro-batching, mismatch, advantages, warnings."""
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from reason.engine import Sample
from reason.records import Problem
from rl.config import AlgorithmConfig, GRPOConfig
from rl.losses import AGG_MODES, group_advantages
from rl.rollout import Group, rollout_metrics
from rl.packing import Row, collate_groups, micro_batches
from rl.step import completion_logprobs, train_on_batch
from rl.trainer import rows_for, warn
from tiny import tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rows(n: int = 6, seed: int = 0) -> list[Row]:
    """Rows of different prompt and completion lengths, so every micro-batch pads."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(10, 400, (3 + i % 4,), generator=g).tolist()
        ids = torch.randint(10, 400, (2 + (i * 3) % 5,), generator=g).tolist()
        ref = -6 + 0.1 * torch.randn(len(ids), generator=g)
        rows.append(Row(prompt, ids, [-6.0] * len(ids), advantage=float(i % 3 - 1), ref_logprobs=ref))
    return rows


def _true_logprobs(lm, row: Row) -> torch.Tensor:
    """log p(completion | prompt) from one unpadded forward."""
    ids = torch.tensor([row.prompt_ids + row.ids])
    logits = lm(ids).logits[0, len(row.prompt_ids) - 1:-1]  # [T, V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(row.ids)[:, None])[:, 0]


def test_padded_micro_batches_give_each_sequence_its_own_logprobs(tok):
    lm, rows = tiny_model("llama", tok).eval(), _rows()
    with torch.no_grad():
        mbs = micro_batches(rows, 4, tok.pad_token_id, CPU)
        assert [mb.mask.shape[0] for mb in mbs] == [4, 2]
        got = {}
        for mb in mbs:
            logp = completion_logprobs(lm, mb).logp  # [n, T]
            for r in range(len(logp)):
                n = int(mb.mask[r].sum())
                got[tuple(mb.targets[r, :n].tolist())] = logp[r, :n]
        for row in rows:
            assert torch.allclose(got[tuple(row.ids)], _true_logprobs(lm, row), atol=1e-5)


def _group_rows(groups: int = 3, size: int = 4) -> list[Row]:
    """GRPO-shaped rows: `groups` prompts of different lengths, `size` completions each."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for k in range(groups):
        prompt = torch.randint(10, 400, (3 + 2 * k,), generator=g).tolist()
        for j in range(size):
            ids = torch.randint(10, 400, (2 + (j * 3 + k) % 5,), generator=g).tolist()
            rows.append(Row(prompt, ids, [-6.0] * len(ids), advantage=float(j % 2) - 0.5))
    return rows


def test_rows_sharing_a_prompt_share_its_forward_with_exact_logprobs_and_gradients(tok):
    rows = _group_rows()
    mbs = micro_batches(rows, 6, tok.pad_token_id, CPU)  # 12 rows, 3 prompts: batches mix two groups
    assert [mb.prompts.shape[0] for mb in mbs] == [2, 2] and [len(mb.prompt_of) for mb in mbs] == [6, 6]
    grads = []
    for checkpointing in (False, True):  # True takes the one-forward-per-row path
        lm = tiny_model("llama", tok)
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        total = 0.0
        for mb in mbs:
            logp = completion_logprobs(lm, mb).logp  # [n, T]
            for r in range(len(logp)):
                n = int(mb.mask[r].sum())
                row = next(x for x in rows if x.ids == mb.targets[r, :n].tolist())
                with torch.no_grad():
                    assert torch.allclose(logp[r, :n], _true_logprobs(lm, row), atol=1e-5)
            total = total + (logp * mb.mask * mb.advantages[:, None]).sum()
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batching_gives_the_whole_batch_gradient(tok, mode):
    algo = AlgorithmConfig(loss_agg=mode, kl_beta=0.1, entropy_gamma=0.01, tis_cap=2.0)
    params = []
    for size in (2, 6):
        lm = tiny_model("llama", tok)
        opt = torch.optim.SGD(lm.parameters(), lr=1.0)
        metrics = train_on_batch(lm, opt, micro_batches(_rows(), size, tok.pad_token_id, CPU), algo,
                                 max_grad_norm=1e9, temperature=0.7, max_len=8, autocast=nullcontext)
        params.append(torch.cat([p.detach().flatten() for p in lm.parameters()]))
        assert metrics["train_sequences"] == 6 and metrics["ratio_max"] == 1.0 and metrics["clip_fraction"] == 0
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_mismatch_and_tis_weights_measure_the_engine_gap(tok):
    lm, rows = tiny_model("llama", tok).eval(), _rows()
    with torch.no_grad():
        for row in rows:  # an engine whose log-probs are 0.1 too high on every token
            row.rollout_logprobs = (_true_logprobs(lm, row) + 0.1).tolist()
    opt = torch.optim.SGD(lm.parameters(), lr=0.0)
    m = train_on_batch(lm, opt, micro_batches(rows, 4, tok.pad_token_id, CPU), AlgorithmConfig(kl_beta=0.0),
                       max_grad_norm=1.0, temperature=1.0, max_len=8, autocast=nullcontext)
    assert m["logprob_mismatch"] == pytest.approx(0.1, abs=1e-4)
    assert m["logprob_mismatch_max"] == pytest.approx(0.1, abs=1e-4)
    assert m["tis_weight_mean"] == pytest.approx(torch.exp(torch.tensor(-0.1)).item(), abs=1e-4)


def test_second_epoch_is_off_policy_and_clipped(tok):
    lm = tiny_model("llama", tok)
    opt = torch.optim.Adam(lm.parameters(), lr=0.05)
    m = train_on_batch(lm, opt, micro_batches(_rows(), 3, tok.pad_token_id, CPU),
                       AlgorithmConfig(epochs=2, kl_beta=0.0, entropy_gamma=0.0), max_grad_norm=1.0,
                       temperature=1.0, max_len=8, autocast=nullcontext)
    assert m["ratio_max"] > 1.2 and m["clip_fraction"] > 0  # epoch 0 is exactly on-policy, epoch 1 is not
    assert opt.state[next(lm.parameters())]["step"] == 2  # one optimiser step per epoch


def _group(rewards: list[float], lengths: list[int], finish: str = "stop", acc: list[float] | None = None) -> Group:
    samples = [Sample("x", [1] * n, [-1.0] * n, finish, n) for n in lengths]
    acc = acc or [float(r > 0) for r in rewards]
    return Group(Problem(id="p", prompt="q"), [5, 6], samples, [{"score": r, "acc": a} for r, a in zip(rewards, acc)])


def test_rows_carry_group_advantages_and_rebalanced_copies():
    groups = [_group([1, -1, -1, -1], [3, 4, 5, 6]), _group([1, 1, 1, 1], [2, 2, 2, 2])]
    cfg = GRPOConfig(data={"train": "x"}, rollout={"group_size": 4}, algorithm={"rebalance": True})
    rows = rows_for(SimpleNamespace(cfg=cfg), groups, step=0)
    adv = group_advantages(torch.tensor([1., -1, -1, -1, 1, 1, 1, 1]), 4)
    assert [r.advantage for r in rows[:8]] == pytest.approx(adv.tolist())
    # 1 positive vs 3 negatives among informative rows: two more copies of the positive one
    assert len(rows) == 10 and all(r.ids == [1, 1, 1] and r.advantage > 0 for r in rows[8:])


def test_rebalancing_copies_correct_samples_not_positive_rewards():
    # accuracy + 0.2 * format: the wrong but well-formed samples (0.2) are negatives, the right one (1.2) positive
    groups = [_group([1.2, 0.2, 0.2, 0.0], [3, 4, 5, 6], acc=[1.0, 0.0, 0.0, 0.0])]
    cfg = GRPOConfig(data={"train": "x"}, rollout={"group_size": 4}, algorithm={"rebalance": True})
    rows = rows_for(SimpleNamespace(cfg=cfg), groups, step=0)
    assert [len(r.ids) for r in rows[4:]] == [3, 3]  # two more copies of the correct sample
    no_verdict = [Group(Problem(id="p", prompt="q"), [5], groups[0].samples, [{"score": 1.0}, {"score": 0.0}] * 2)]
    with pytest.raises(ValueError, match="algorithm.rebalance needs a correctness verdict"):
        rows_for(SimpleNamespace(cfg=cfg), no_verdict, step=0)


def test_rollout_metrics_and_loud_warnings(capsys):
    groups = [_group([1, 1, 1, 1], [10, 10, 20, 20], "length"), _group([0, 0, 0, 0], [8, 8, 8, 8], "length")]
    m = rollout_metrics(groups, 4)
    assert m["response_len/mean"] == 11.5 and m["response_len/max"] == 20 and m["truncation_ratio"] == 1.0
    assert m["accuracy"] == 0.5 and m["response_len/correct_mean"] == 15 and m["zero_variance_frac"] == 1.0
    assert m["reward/mean"] == 0.5 and m["reward/acc"] == 0.5
    warn(7, {**m, "groups/kept": 0}, GRPOConfig(data={"train": "x"}, rollout={"max_tokens": 20}))
    err = " ".join(capsys.readouterr().err.split())
    assert "WARNING step 7: 100% of responses hit rollout.max_tokens=20" in err
    assert "every group's rewards are all equal" in err and "no group left to train on" in err


def test_only_consecutive_rows_share_a_prompt_forward(tok):
    rows = _group_rows(groups=2, size=2)
    mb = collate_groups([rows[0], rows[2], rows[1], rows[3]], tok.pad_token_id, CPU)  # prompts A B A B
    assert mb.prompts.shape[0] == 4 and mb.prompt_of.tolist() == [0, 1, 2, 3]
    mb = collate_groups(rows, tok.pad_token_id, CPU)  # A A B B
    assert mb.prompts.shape[0] == 2 and mb.prompt_of.tolist() == [0, 0, 1, 1]
