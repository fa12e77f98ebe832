"""The GRPO update's layouts and head: token-budget packed micro-batches, padding counts, the chunked LM head.

Every test compares against an independent path: each row run alone and unpadded, or the
fixed-row padded layout with the whole [n, T, V] logits at once (the update before the
LM head was chunked and micro-batches packed).
"""
from contextlib import nullcontext

import pytest
import torch

from reason.config import ConfigError, load_config
from reason.errors import UserError
from rl.config import AlgorithmConfig, GRPOConfig
from rl.losses import AGG_MODES
from rl.packing import Row, collate_groups, micro_batches, padding, token_chunks
from rl.step import completion_logprobs, reference_logprobs, train_on_batch
from test_grpo_step import _true_logprobs
from test_logprobs import CountingHead
from tiny import tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rows(groups: int = 3, size: int = 4, seed: int = 1) -> list[Row]:
    """GRPO-shaped rows: prompts of different lengths, completions of different lengths, one truncated per group."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(groups):
        prompt = torch.randint(10, 400, (3 + 2 * k,), generator=g).tolist()
        for j in range(size):
            ids = torch.randint(10, 400, (1 + (j * 3 + k) % 6,), generator=g).tolist()
            ref = -6 + 0.1 * torch.randn(len(ids), generator=g)
            rollout = (-6 + 0.3 * torch.randn(len(ids), generator=g)).tolist()
            rows.append(Row(prompt, ids, rollout, advantage=float(j % 3) - 1, ref_logprobs=ref, truncated=j == 1))
    return rows


def _step(tok, rows, algo, chunk, tokens=None, size=5, checkpointing=False, autocast=nullcontext):
    """Gradients and metrics of one update (SGD at lr 0 leaves the gradients in place)."""
    lm = tiny_model("llama", tok)
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.SGD(lm.parameters(), lr=0.0)
    mbs = micro_batches(rows, size, tok.pad_token_id, CPU, tokens)
    m = train_on_batch(lm, opt, mbs, algo, max_grad_norm=1e9, temperature=0.7, max_len=8, autocast=autocast,
                       logits_chunk=chunk)
    return torch.cat([p.grad.flatten() for p in lm.parameters()]), m, mbs


ALGOS = {
    "default": dict(kl_beta=0.1, entropy_gamma=0.01),
    "gspo+mask": dict(kl_beta=0.1, entropy_gamma=0.01, ratio_level="sequence", tis_mode="sequence_mask",
                      mask_truncated=True),
}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("options", list(ALGOS))
def test_chunked_head_and_packed_micro_batches_give_the_full_logits_padded_gradient(tok, mode, options):
    algo = AlgorithmConfig(loss_agg=mode, **ALGOS[options])
    want, m_want, _ = _step(tok, _rows(), algo, chunk=0)  # fixed rows, padded, whole logits
    for chunk, tokens in ((3, None), (3, 30), (0, 30)):
        got, m, mbs = _step(tok, _rows(), algo, chunk=chunk, tokens=tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for k in ("loss", "kl", "entropy", "logprob_mismatch", "tis_weight_mean"):
            assert m[k] == pytest.approx(m_want[k], abs=1e-5), k
    assert want.abs().sum() > 0 and len(mbs) > 1 and all(mb.packed is not None for mb in mbs)


def test_packed_micro_batches_train_under_bf16_autocast_like_padded_ones(tok):
    # Under autocast RoPE leaves query and key in float32 and value in bf16; sdpa's autocast cast
    # evens them, but the causal-bias dispatch of the packed path validated them first and failed.
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    want, _, _ = _step(tok, _rows(), AlgorithmConfig(), chunk=0, autocast=bf16)
    got, _, mbs = _step(tok, _rows(), AlgorithmConfig(), chunk=0, tokens=30, autocast=bf16)
    assert all(mb.packed is not None for mb in mbs)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99  # bf16 rounds the layouts differently


def test_the_head_sees_at_most_a_chunk_of_completion_positions(tok):
    lm = tiny_model("llama", tok)
    head = CountingHead(lm.lm_head)
    lm.lm_head = head
    mbs = micro_batches(_rows(), 12, tok.pad_token_id, CPU)
    train_on_batch(lm, torch.optim.SGD(lm.parameters(), lr=0.0), mbs, AlgorithmConfig(), max_grad_norm=1.0,
                   temperature=1.0, max_len=8, autocast=nullcontext, logits_chunk=4)
    assert max(head.calls) == 4
    assert sum(head.calls) == 2 * sum(len(r.ids) for r in _rows())  # completions only, never padding: once + recompute


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_see_their_prompt_and_never_a_sibling(tok, impl, checkpointing):
    lm = tiny_model("qwen2", tok).eval()
    lm.set_attn_implementation(impl)
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = _rows()
    mb = collate_groups(rows, tok.pad_token_id, CPU, packed=True)
    assert mb.packed.input_ids.shape[1] == sum(len(r.ids) for r in rows) + sum(3 + 2 * k for k in range(3))
    with torch.no_grad():
        logp = completion_logprobs(lm, mb, chunk=5).logp  # [n, T]
        for r, row in enumerate(rows):
            torch.testing.assert_close(logp[r, :len(row.ids)], _true_logprobs(lm, row), rtol=0, atol=1e-5)
            assert (logp[r, len(row.ids):] == 0).all()


def test_sdpa_attends_segment_by_segment_never_over_the_whole_packed_sequence(tok, monkeypatch):
    """With sdpa the packed forward never attends over the whole [L, L]: a completion's keys are its prompt and
    itself, so the attention's cost grows with L, not L^2 (at L = 729 on SmolLM2-135M the dense mask's backward
    was 14% of a GRPO update)."""
    rows = _rows()
    mb = collate_groups(rows, tok.pad_token_id, CPU, packed=True)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lm = tiny_model("llama", tok)
    lm.set_attn_implementation("sdpa")
    completion_logprobs(lm, mb, chunk=5).logp.sum().backward()
    longest = max(len(r.prompt_ids) + len(r.ids) for r in rows)
    assert seen and max(k for _, k in seen) <= longest < mb.packed.input_ids.shape[1]
    groups = len({tuple(r.prompt_ids) for r in rows})
    assert len(seen) == lm.config.num_hidden_layers * (groups + len(rows))  # one call per prompt and per completion
    assert lm.config._attn_implementation == "sdpa"  # restored after the forward


def test_reference_logprobs_are_the_same_packed_or_padded(tok):
    ref, rows = tiny_model("llama", tok).eval(), _rows()
    padded = reference_logprobs(ref, rows, 5, tok.pad_token_id, 0.7, nullcontext)
    packed = reference_logprobs(ref, rows, 5, tok.pad_token_id, 0.7, nullcontext, tokens=25, chunk=3)
    for a, b, row in zip(padded, packed, rows):
        assert a.shape == (len(row.ids),)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _hand_rows() -> list[Row]:
    a, b = [1, 2, 3], [4, 5, 6, 7, 8]
    return [Row(a, [9, 9], [0.0] * 2), Row(a, [9, 9, 9, 9], [0.0] * 4), Row(b, [9], [0.0])]


def test_padded_fraction_by_hand(tok):
    mb = collate_groups(_hand_rows(), tok.pad_token_id, CPU)
    # prompts [2, 5]: 3 + 5 real of 10; completions [3, 4]: 2 + 4 + 1 real of 12 -> 7 pads of 22
    assert padding(mb, per_row=False) == (7, 22)
    # one [3, 5 + 4] forward per row (gradient checkpointing): (3+2) + (3+4) + (5+1) = 18 real of 27
    assert padding(mb, per_row=True) == (9, 27)
    assert padding(collate_groups(_hand_rows(), tok.pad_token_id, CPU, packed=True), per_row=False) == (0, 3 + 6 + 5 + 1)
    lm = tiny_model("llama", tok)
    for tokens, want in ((None, 7 / 22), (64, 0.0)):
        m = train_on_batch(lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                           micro_batches(_hand_rows(), 3, tok.pad_token_id, CPU, tokens), AlgorithmConfig(kl_beta=0.0),
                           max_grad_norm=1.0, temperature=1.0, max_len=8, autocast=nullcontext)
        assert m["train/padded_fraction"] == pytest.approx(want)


def test_token_budget_counts_a_shared_prompt_once_and_refuses_a_row_that_cannot_fit():
    rows = _hand_rows()  # costs: prompt a (3) + 2, then + 4 (prompt shared), then prompt b (5) + 1
    assert token_chunks(rows, 9) == [[0, 1], [2]]
    assert token_chunks(rows, 15) == [[0, 1, 2]]
    assert token_chunks(rows, 8) == [[0], [1], [2]]  # 3 + 2 + 4 > 8: the second row opens a new one
    with pytest.raises(UserError, match="train.micro_batch_tokens 6 is smaller than a row of 7 tokens"):
        token_chunks(rows, 6)


def test_config_refuses_a_budget_below_the_longest_row_and_flash_attention():
    base = ["data.train=p.jsonl", "rollout.max_prompt_tokens=100", "rollout.max_tokens=400"]
    assert load_config(GRPOConfig, None, [*base, "train.micro_batch_tokens=500"]).train.micro_batch_tokens == 500
    with pytest.raises(ConfigError, match="train.micro_batch_tokens 499 is smaller than the longest row"):
        load_config(GRPOConfig, None, [*base, "train.micro_batch_tokens=499"])
    with pytest.raises(ConfigError, match="train.micro_batch_tokens: packed micro-batches need a custom"):
        load_config(GRPOConfig, None, [*base, "train.micro_batch_tokens=500",
                                       "model.attn_implementation=flash_attention_2"])


def test_truncated_rows_carry_their_flag_and_get_no_gradient(tok):
    from types import SimpleNamespace

    from rl.trainer import rows_for
    from test_grpo_step import _group

    cfg = GRPOConfig(data={"train": "x"}, rollout={"group_size": 4})
    rows = rows_for(SimpleNamespace(cfg=cfg), [_group([1, 0, 0, 1], [3, 4, 5, 6], "length")], step=0)
    assert [r.truncated for r in rows] == [True] * 4
    rows = [Row(r.prompt_ids, r.ids, r.rollout_logprobs, r.advantage, truncated=True) for r in _rows()]
    for masked, moved in ((False, True), (True, False)):
        algo = AlgorithmConfig(kl_beta=0.0, entropy_gamma=0.01, mask_truncated=masked)
        grad, m, _ = _step(tok, rows, algo, chunk=4)
        assert bool(grad.abs().sum() > 0) is moved and m["train_tokens"] == (0 if masked else 42)


def test_sequence_mask_defaults_to_trl_s_cap():
    assert AlgorithmConfig(tis_mode="sequence_mask").tis_cap == 3.0
    assert AlgorithmConfig(tis_mode="sequence_mask", tis_cap=5.0).tis_cap == 5.0
    assert AlgorithmConfig().tis_cap == 2.0 and AlgorithmConfig().tis_mode == "token_truncate"
