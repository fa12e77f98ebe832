"""GRPO maths on hand-computed inputs: advantages, log-probs, entropy, KL, clipping, aggregation."""
import doctest
import math

import pytest
import torch

import rl.losses
from reason.logprobs import entropy_from_logits, token_logprobs
from rl.losses import (aggregate, group_advantages, grpo_loss, kl_estimate, log_ratio, mask_truncated, policy_loss,
                       sequence_mask_weights, tis_weights)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=tol)


def test_docstring_examples():
    assert doctest.testmod(rl.losses).failed == 0


# --- advantages ---------------------------------------------------------------


def test_group_advantages_std_is_unbiased():
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt(0.5) (the biased one, 0.5, would give +-1)
    s = math.sqrt(0.5)
    close(group_advantages(t([1, 0, 0, 1]), 2, eps=0.0), [s, -s, -s, s])
    # [1, 0, 0, 0]: mean 0.25, squared deviations sum 0.75, unbiased var 0.75 / 3 = 0.25, std 0.5
    close(group_advantages(t([1, 0, 0, 0]), 4, eps=0.0), [1.5, -0.5, -0.5, -0.5])


def test_group_advantages_eps_added_to_std():
    close(group_advantages(t([1, 0, 0, 0]), 4, eps=0.5), [0.75, -0.25, -0.25, -0.25])


def test_group_advantages_dr_grpo_no_scaling():
    close(group_advantages(t([1, 0, 0, 0, 3, 3, 1, 1]), 4, scale="none"), [0.75, -0.25, -0.25, -0.25, 1, 1, -1, -1])


def test_group_advantages_zero_variance_group_is_zero():
    close(group_advantages(t([1, 1, 1, 0, 0, 0]), 3), [0, 0, 0, 0, 0, 0])


def test_group_advantages_integer_rewards():
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), 2, scale="none")
    assert adv.dtype == torch.float32 and adv.tolist() == [0.5, -0.5, -0.5, 0.5]


@pytest.mark.parametrize("kwargs", [{"group_size": 1}, {"group_size": 3}, {"group_size": 2, "scale": "batch"}])
def test_group_advantages_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        group_advantages(t([1, 0, 0, 1]), **kwargs)


# --- log-probs and entropy ------------------------------------------------------


def test_token_logprobs_two_classes():
    logits = t([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # softmax [1/4, 3/4]
    close(token_logprobs(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.25)]])


def test_token_logprobs_temperature():
    logits = t([[[0.0, math.log(3)]]])  # at T=2: softmax of [0, ln(3)/2] = [1, sqrt 3] / (1 + sqrt 3)
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    close(token_logprobs(logits, torch.tensor([[1]]), temperature=2.0), [[expected]])


@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_token_logprobs_match_log_softmax_gather(chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g, dtype=F64)
    ids = torch.randint(0, 11, (3, 4), generator=g)
    expected = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    close(token_logprobs(logits, ids, chunk_rows=chunk_rows), expected)


def test_token_logprobs_bf16_upcast():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 50, generator=g) * 5).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 3), generator=g)
    out = token_logprobs(logits, ids)
    exact = logits.double().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    close(out.double(), exact, tol=1e-5)


def test_token_logprobs_shape_mismatch():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("vocab", [2, 7, 1000])
def test_entropy_of_uniform_is_log_v(vocab):
    logits = torch.full((2, 3, vocab), 4.2, dtype=F64)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(vocab), dtype=F64))


def test_entropy_two_classes_and_temperature():
    logits = t([[[0.0, math.log(3)]]])  # p = [1/4, 3/4]
    close(entropy_from_logits(logits), [[math.log(4) - 0.75 * math.log(3)]])
    # temperature -> infinity flattens to uniform
    close(entropy_from_logits(logits, temperature=1e9), [[math.log(2)]])


def test_entropy_has_gradient():
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    entropy_from_logits(logits, chunk_rows=2).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --- KL --------------------------------------------------------------------------

LOGP, REF = t([[-1.0]]), t([[-1.2]])  # log r = ref - logp = -0.2


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", 0.2),  # logp - ref
        ("k2", 0.02),  # 0.2^2 / 2
        ("k3", math.exp(-0.2) - 1 + 0.2),  # r - 1 - log r = 0.0187307530779818
        ("low_var_kl", math.exp(-0.2) - 1 + 0.2),
    ],
)
def test_kl_estimators(kind, expected):
    close(kl_estimate(LOGP, REF, kind), [[expected]])


def test_low_var_kl_clamps_where_k3_does_not():
    logp, ref = t([[0.0, -30.0]]), t([[-30.0, 0.0]])  # log r = -30 and +30
    close(kl_estimate(logp, ref, "k3"), [[math.exp(-30) + 29, math.exp(30) - 31]], tol=1e-3)
    close(kl_estimate(logp, ref, "low_var_kl"), [[10.0, 10.0]])
    # log r clamped to -20 first: exp(-20) - 1 + 20 = 19.000000002 < 30
    close(kl_estimate(t([[0.0]]), t([[-15.0]]), "low_var_kl"), [[10.0]])
    close(kl_estimate(t([[0.0]]), t([[-5.0]]), "low_var_kl"), [[math.exp(-5) + 4]])


def test_kl_direction_is_pi_to_ref():
    # Average the estimators over tokens sampled from pi: they must approach KL(pi || ref), not KL(ref || pi).
    pi, ref = t([0.7, 0.2, 0.1]), t([0.2, 0.3, 0.5])
    forward = float((pi * (pi / ref).log()).sum())  # 0.5838
    reverse = float((ref * (ref / pi).log()).sum())  # 0.7324
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref_logp = pi.log()[tokens], ref.log()[tokens]
    for kind in ("k1", "k3"):
        estimate = float(kl_estimate(logp, ref_logp, kind).mean())
        assert abs(estimate - forward) < 0.01 < abs(estimate - reverse)


def test_kl_unknown_kind():
    with pytest.raises(ValueError):
        kl_estimate(LOGP, REF, "k4")


# --- TIS ---------------------------------------------------------------------------


def test_tis_weights_ratio_and_cap():
    old = t([[math.log(1.5), math.log(3.0), math.log(0.5), 100.0]])
    w = tis_weights(old, torch.zeros_like(old), cap=2.0)
    close(w, [[1.5, 2.0, 0.5, 2.0]])
    close(tis_weights(old, torch.zeros_like(old), cap=10.0), [[1.5, 3.0, 0.5, 10.0]])
    assert not w.requires_grad


def test_tis_weights_carry_no_gradient():
    old = t([[0.3]]).requires_grad_()
    assert not tis_weights(old, t([[0.0]])).requires_grad
    with pytest.raises(ValueError):
        tis_weights(old, t([[0.0]]), cap=0.0)


# --- clipped policy loss --------------------------------------------------------------
# Row 0 has A = +1, row 1 has A = -1; ratios 1.5 (above 1.2), 0.5 (below 0.8), 1.1 (inside).
RATIOS = t([[1.5, 0.5, 1.1], [0.5, 1.5, 1.1]])
ADV = t([1.0, -1.0])
MASK = torch.ones(2, 3, dtype=torch.bool)


def _logps(ratios):
    logp = ratios.log().clone().requires_grad_()
    return logp, torch.zeros_like(ratios)


def test_policy_loss_clips_at_both_boundaries():
    logp, old = _logps(RATIOS)
    loss, stats = policy_loss(logp, old, ADV, MASK)
    # A>0: -min(1.5, 1.2) = -1.2 (clipped), -min(0.5, 0.8) = -0.5, -1.1
    # A<0: -min(-0.5, -0.8) = 0.8 (clipped), -min(-1.5, -1.2) = 1.5, 1.1
    close(loss, [[-1.2, -0.5, -1.1], [0.8, 1.5, 1.1]])
    close(stats["clip_fraction"], 2 / 6)
    close(stats["clip_high_fraction"], 1 / 6)
    close(stats["clip_low_fraction"], 1 / 6)
    close(stats["ratio_mean"], 6.2 / 6)
    close(stats["ratio_max"], 1.5)
    # clipped tokens get no gradient; the others d/dlogp (-A r) = -A r
    loss.sum().backward()
    close(logp.grad, [[0.0, -0.5, -1.1], [0.0, 1.5, 1.1]])


def test_policy_loss_clip_higher():
    logp, old = _logps(t([[1.25, 1.5]]))
    loss, stats = policy_loss(logp, old, t([1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    close(loss, [[-1.25, -1.28]])  # 1.25 is inside 1 + 0.28; 1.5 is clipped to 1.28
    close(stats["clip_fraction"], 0.5)
    loss, _ = policy_loss(logp, old, t([1.0]), torch.ones(1, 2))
    close(loss, [[-1.2, -1.2]])


def test_policy_loss_stats_ignore_masked_tokens():
    logp, old = _logps(RATIOS)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # hide the low-clipped token
    _, stats = policy_loss(logp, old, ADV, mask)
    close(stats["clip_fraction"], 1 / 5)
    close(stats["clip_low_fraction"], 0.0)
    close(stats["ratio_mean"], (3.1 + 2.6) / 5)


def test_policy_loss_token_advantages_and_is_weights():
    logp, old = _logps(RATIOS)
    per_seq, _ = policy_loss(logp, old, ADV, MASK)
    per_tok, _ = policy_loss(logp, old, ADV[:, None].expand(2, 3), MASK)
    close(per_tok, per_seq)
    w = t([[2.0, 1.0, 0.5], [1.0, 0.0, 1.0]])
    weighted, _ = policy_loss(logp, old, ADV, MASK, is_weights=w)
    close(weighted, [[-2.4, -0.5, -0.55], [0.8, 0.0, 1.1]])


def test_policy_loss_rejects_bad_clip():
    logp, old = _logps(RATIOS)
    with pytest.raises(ValueError):
        policy_loss(logp, old, ADV, MASK, clip_low=1.0)


# --- aggregation -------------------------------------------------------------------
PER_TOKEN = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode, max_len, expected",
    [
        ("token-mean", None, 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-mean", None, 2.75),  # (3/2 + 4/1) / 2
        ("seq-mean-token-sum", None, 3.5),  # (3 + 4) / 2
        ("seq-mean-token-sum-norm", None, 7 / 6),  # 7 / (B=2 * T=3)
        ("seq-mean-token-sum-norm", 10, 7 / 20),  # 7 / (B=2 * max_len=10)
    ],
)
def test_aggregate_modes(mode, max_len, expected):
    close(aggregate(PER_TOKEN, AGG_MASK, mode, max_len), expected)
    # garbage under the mask changes nothing
    dirty = PER_TOKEN.clone()
    dirty[0, 2], dirty[1, 1], dirty[1, 2] = float("nan"), float("inf"), -float("inf")
    close(aggregate(dirty, AGG_MASK, mode, max_len), expected)


def test_aggregate_empty_sequence_counts_as_zero():
    mask = torch.tensor([[1, 1], [0, 0]])
    close(aggregate(t([[1.0, 2.0], [3.0, 4.0]]), mask, "seq-mean-token-mean"), 0.75)
    close(aggregate(t([[1.0, 2.0], [3.0, 4.0]]), mask, "token-mean"), 1.5)


def test_aggregate_errors():
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, AGG_MASK, "sum")
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, AGG_MASK, "seq-mean-token-sum-norm", max_len=2)


# --- the composed loss -----------------------------------------------------------------


def test_grpo_loss_composes_terms():
    logp, old = _logps(RATIOS)
    ref = (logp - 0.1).detach()  # k1 = logp - ref = 0.1 on every token
    entropy = torch.full((2, 3), 2.0, dtype=F64)
    loss, m = grpo_loss(logp, old, ADV, MASK, ref_logp=ref, entropy=entropy, beta=0.5, gamma=0.25, kl_kind="k1")
    # policy token-mean: (-1.2 - 0.5 - 1.1 + 0.8 + 1.5 + 1.1) / 6 = 0.1
    close(loss, 0.1 + 0.5 * 0.1 - 0.25 * 2.0)
    assert m == pytest.approx(
        {
            "loss": -0.35,
            "policy_loss": 0.1,
            "kl": 0.1,
            "entropy": 2.0,
            "clip_fraction": 1 / 3,
            "clip_high_fraction": 1 / 6,
            "clip_low_fraction": 1 / 6,
            "ratio_mean": 6.2 / 6,
            "ratio_max": 1.5,
        },
        abs=1e-12,
    )
    assert all(type(v) is float for v in m.values())
    loss.backward()
    assert logp.grad is not None


def test_grpo_loss_mode_applies_to_every_term():
    logp, old = _logps(RATIOS)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    entropy = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    loss, m = grpo_loss(logp, old, ADV, mask, entropy=entropy, gamma=1.0, mode="seq-mean-token-mean")
    # policy: (-2.8/3 + 0.8) / 2; entropy: (2 + 4) / 2 = 3; the logged entropy is the token mean 10/4
    close(loss, (-2.8 / 3 + 0.8) / 2 - 3.0)
    assert m["entropy"] == pytest.approx(2.5)
    assert m["policy_loss"] == pytest.approx((-2.8 / 3 + 0.8) / 2)


def test_grpo_loss_logs_kl_without_penalising():
    logp, old = _logps(RATIOS)
    loss_plain, m_plain = grpo_loss(logp, old, ADV, MASK)
    loss_logged, m_logged = grpo_loss(logp, old, ADV, MASK, ref_logp=logp.detach() - 0.1, kl_kind="k1")
    close(loss_logged, loss_plain.detach())
    assert "kl" not in m_plain and "entropy" not in m_plain
    assert m_logged["kl"] == pytest.approx(0.1)


def test_grpo_loss_needs_inputs_for_its_coefficients():
    logp, old = _logps(RATIOS)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, ADV, MASK, beta=0.001)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp, old, ADV, MASK, gamma=0.001)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, ADV, MASK, beta=-1.0, ref_logp=old)


# --- GSPO's sequence ratio, sequence-masked importance sampling, overlong filtering ------


def test_sequence_ratio_is_the_mean_log_ratio_over_each_sequence():
    logp = t([[0.05, 0.09, 7.0], [-0.3, 5.0, 5.0]])  # 7.0 and 5.0 sit where the mask is 0
    got = log_ratio(logp, torch.zeros(2, 3, dtype=F64), torch.tensor([[1, 1, 0], [1, 0, 0]]), "sequence")
    close(got, [[0.07] * 3, [-0.3] * 3])
    close(log_ratio(logp, torch.zeros(2, 3, dtype=F64), torch.ones(2, 3), "token"), [[0.05, 0.09, 7.0], [-0.3, 5, 5]])
    with pytest.raises(ValueError, match="level"):
        log_ratio(logp, logp, torch.ones(2, 3), "batch")


def test_gspo_loss_and_gradient_by_hand():
    # one sequence, tokens at log-ratios 0.05 and 0.09: s = exp(0.07) = 1.0725 (inside the clip), A = 1.
    # token-mean of -s over its 2 tokens is -s; d(-s)/d logp_t = -s * 1/2 for each token.
    logp = t([[0.05, 0.09]]).requires_grad_()
    loss, m = grpo_loss(logp, torch.zeros(1, 2, dtype=F64), t([1.0]), torch.ones(1, 2), ratio_level="sequence")
    s = math.exp(0.07)
    close(loss, -s)
    loss.backward()
    close(logp.grad, [[-s / 2, -s / 2]])
    assert m["ratio_mean"] == pytest.approx(s) and m["clip_fraction"] == 0.0
    # the same tokens with A = 1 and s = exp(0.25) > 1.2: the whole sequence is clipped, no gradient
    logp = t([[0.2, 0.3]]).requires_grad_()
    loss, m = grpo_loss(logp, torch.zeros(1, 2, dtype=F64), t([1.0]), torch.ones(1, 2), ratio_level="sequence")
    close(loss, -1.2)
    loss.backward()
    close(logp.grad, [[0.0, 0.0]])
    assert m["clip_fraction"] == 1.0


def test_sequence_mask_weights_by_hand():
    old = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0], [-0.5, -0.5, -0.5]])
    rollout = old - t([[0.4, 0.3, 0.0], [0.6, 0.6, 9.0], [-2.0, 0.0, 0.0]])  # old - rollout per token
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])  # 9.0 is masked: it must not count
    w = sequence_mask_weights(old, rollout, mask, cap=3.0)
    # sequence sums 0.7 (w 2.01), 1.2 (w 3.32 > 3: masked), -2.0 (w 0.135: kept as is, no lower cap)
    close(w, [[math.exp(0.7)] * 3, [0.0] * 3, [math.exp(-2.0)] * 3])
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        sequence_mask_weights(old, rollout, mask, cap=0.0)


def test_truncated_completions_get_no_loss_but_count_as_sequences():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cut = mask_truncated(mask, torch.tensor([False, True]))
    assert cut.tolist() == [[1, 1, 0], [0, 0, 0]] and cut.dtype == mask.dtype
    per_token = t([[1.0, 2.0, 9.0], [5.0, 5.0, 5.0]])
    assert aggregate(per_token, cut, "token-mean").item() == pytest.approx(1.5)
    assert aggregate(per_token, cut, "seq-mean-token-mean").item() == pytest.approx(0.75)  # (1.5 + 0) / 2
