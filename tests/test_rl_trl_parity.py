"""Cross-check rl.losses against TRL's own GRPO loss code on the same random tensors.

TRL's `GRPOTrainer._compute_loss` is called unbound, with `self` a plain namespace
carrying only the attributes it reads; its one model call
(`_get_per_token_logps_and_entropies`) returns our prepared log-probs and entropies.
Everything after that, the loss itself, is TRL's code. Loss types map to our modes:
grpo -> seq-mean-token-mean, bnpo and dapo -> token-mean, dr_grpo ->
seq-mean-token-sum-norm (max_len = max_completion_length), luspo ->
seq-mean-token-sum. TRL's KL is k3 and its entropy bonus is always a token mean, so
the entropy term is compared only where our mode is the token mean too.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from components import require
from reason.logprobs import entropy_from_logits, token_logprobs
from rl.losses import group_advantages, grpo_loss, mask_truncated, sequence_mask_weights, tis_weights

trl = require("trl", "trl==1.16.0, the dev extra")
pytestmark = pytest.mark.slow  # importing TRL's trainer takes 15-40 s here

B, G, T, MAX_LEN = 4, 4, 9, 12
MODES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    n = B * G
    logp = -3 * torch.rand(n, T, generator=g, dtype=torch.float64)  # [B*G, T]
    old = logp + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)  # ratios well past the clip
    ref = logp + 0.2 * torch.randn(n, T, generator=g, dtype=torch.float64)
    rollout = old + 0.5 * torch.randn(n, T, generator=g, dtype=torch.float64)
    entropy = 2 * torch.rand(n, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # right-padded
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    return dict(logp=logp, old=old, ref=ref, rollout=rollout, entropy=entropy, mask=mask, rewards=rewards)


def _trl_loss(loss_type, d, adv, beta, entropy_coef, clip, is_weights, level="token"):
    """TRL's _compute_loss on our tensors; returns (loss, grad wrt logp, TRL's logged metrics)."""
    from trl import GRPOTrainer

    logp = d["logp"].clone().requires_grad_()
    same = lambda x, **_: x  # noqa: E731  (one process: gather/reduce are the identity)
    metrics = defaultdict(lambda: defaultdict(list))
    fake_self = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, d["entropy"], None),
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=clip[0],
        epsilon_high=clip[1],
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=is_weights is not None,
        vllm_importance_sampling_correction=is_weights is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN,
        accelerator=SimpleNamespace(
            num_processes=1, gather=same, reduce=same, gather_for_metrics=same, sync_gradients=True
        ),
        _entropy_bonus_enabled=entropy_coef != 0.0,
        use_adaptive_entropy=False,
        entropy_coef=entropy_coef,
        _metrics=metrics,
    )
    n = d["mask"].shape[0]
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, T, dtype=torch.long),
        "completion_mask": d["mask"],
        "advantages": adv,
        "old_per_token_logps": d["old"],
        "ref_per_token_logps": d["ref"],
        "importance_sampling_ratio": is_weights,
        "num_items_in_batch": d["mask"].sum(),
    }
    loss = GRPOTrainer._compute_loss(fake_self, None, inputs)
    loss.backward()
    return loss.detach(), logp.grad, metrics["train"]


CASES = [
    # (beta, entropy_coef, (clip_low, clip_high), use TIS)
    (0.0, 0.0, (0.2, 0.2), False),
    (0.04, 0.0, (0.2, 0.28), False),
    (0.001, 0.001, (0.2, 0.2), True),  # Phi-4-reasoning-plus beta/gamma
    (0.1, 0.05, (0.1, 0.3), True),
]


@pytest.mark.parametrize("loss_type", list(MODES))
@pytest.mark.parametrize("beta, gamma, clip, tis", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_match_trl(loss_type, beta, gamma, clip, tis, seed):
    mode = MODES[loss_type]
    if gamma and mode != "token-mean":
        gamma = 0.0  # TRL's entropy bonus is a token mean whatever the loss type; ours follows `mode`
    d = _batch(seed)
    adv = group_advantages(d["rewards"], G, scale="none" if loss_type == "dr_grpo" else "std")
    w = tis_weights(d["old"], d["rollout"], cap=2.0) if tis else None
    want, want_grad, logged = _trl_loss(loss_type, d, adv, beta, gamma, clip, w)

    logp = d["logp"].clone().requires_grad_()
    got, m = grpo_loss(
        logp, d["old"], adv, d["mask"], ref_logp=d["ref"], entropy=d["entropy"], beta=beta, gamma=gamma,
        kl_kind="k3", clip_low=clip[0], clip_high=clip[1], is_weights=w, mode=mode, max_len=MAX_LEN,
    )  # fmt: skip
    got.backward()
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logp.grad, want_grad, rtol=0, atol=1e-6)
    assert m["clip_fraction"] == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-6)
    assert m["clip_high_fraction"] == pytest.approx(logged["clip_ratio/high_mean"][0], abs=1e-6)
    assert m["clip_low_fraction"] == pytest.approx(logged["clip_ratio/low_mean"][0], abs=1e-6)
    assert m["entropy"] == pytest.approx(logged["entropy"][0], abs=1e-6)
    if beta:
        assert m["kl"] == pytest.approx(logged["kl"][0], abs=1e-6)


def test_the_batch_exercises_clipping_and_the_cap():
    d = _batch(0)
    ratio = (d["logp"] - d["old"]).exp()[d["mask"].bool()]
    assert (ratio > 1.3).any() and (ratio < 0.8).any()
    assert (tis_weights(d["old"], d["rollout"]) == 2.0).any()


def test_logprobs_and_entropy_match_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy
    from trl.trainer.utils import selective_log_softmax

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 5, 17, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 17, (3, 5), generator=g)
    for temperature in (1.0, 0.6):
        want = selective_log_softmax(logits, ids, temperature=temperature)
        torch.testing.assert_close(token_logprobs(logits, ids, temperature, chunk_rows=4), want, rtol=0, atol=1e-6)
        want = trl_entropy(logits / temperature)
        torch.testing.assert_close(entropy_from_logits(logits, temperature, chunk_rows=4), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- GSPO, sequence-masked IS, overlong filtering

def _trl_block(method, first: str, last: str, **names) -> dict:
    """Run the lines of a TRL GRPOTrainer method from the one starting `first` up to the one starting `last`,
    with `names` as its variables; returns them afterwards. TRL computes these inline, not in functions."""
    import inspect
    import math
    import textwrap

    src = inspect.getsource(method)
    start, end = src.index(first), src.index(last)
    start = src.rindex("\n", 0, start) + 1  # from the start of the line, for dedent
    scope = {"torch": torch, "math": math, **names}  # one namespace: TRL's comprehensions read its variables
    exec(textwrap.dedent(src[start:end]), scope)
    return scope


def _trl_sequence_mask(old, rollout, mask, cap):
    from trl import GRPOTrainer

    me = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                         vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=cap,
                         vllm_importance_sampling_clip_min=None)
    scope = _trl_block(GRPOTrainer._generate_and_score_completions,
                       "# Compute the importance sampling ratio when using vLLM",
                       "# Compute the per-token log probabilities for the reference model",
                       self=me, completion_mask=mask, tool_mask=None, old_per_token_logps=old,
                       sampling_per_token_logps=rollout)
    return scope["vllm_importance_sampling_ratio"]  # [B, 1]


@pytest.mark.parametrize("loss_type", list(MODES))
@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_and_sequence_masked_is_match_trl(loss_type, seed):
    """importance_sampling_level="sequence" and vllm_importance_sampling_mode="sequence_mask" (cap 3.0):
    TRL's weights, loss and gradient against ours, with KL and the entropy bonus where TRL's matches ours."""
    mode = MODES[loss_type]
    d = _batch(seed)
    d["rollout"] = d["old"] + 0.4 * torch.randn(d["old"].shape, generator=torch.Generator().manual_seed(seed),
                                                 dtype=torch.float64)  # sequence sums around the cap
    trl_w = _trl_sequence_mask(d["old"], d["rollout"], d["mask"], 3.0)  # [B, 1]
    w = sequence_mask_weights(d["old"], d["rollout"], d["mask"], cap=3.0)  # [B, T]
    torch.testing.assert_close(w, trl_w.expand_as(w), rtol=0, atol=1e-12)
    assert (trl_w == 0).any() and (trl_w > 0).any()  # the batch exercises the mask
    adv = group_advantages(d["rewards"], G, scale="none" if loss_type == "dr_grpo" else "std")
    gamma = 0.01 if mode == "token-mean" else 0.0
    want, want_grad, _ = _trl_loss(loss_type, d, adv, 0.04, gamma, (0.2, 0.28), trl_w, level="sequence")
    logp = d["logp"].clone().requires_grad_()
    got, _ = grpo_loss(logp, d["old"], adv, d["mask"], ref_logp=d["ref"], entropy=d["entropy"], beta=0.04,
                       gamma=gamma, kl_kind="k3", clip_low=0.2, clip_high=0.28, is_weights=w, mode=mode,
                       max_len=MAX_LEN, ratio_level="sequence")
    got.backward()
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logp.grad, want_grad, rtol=0, atol=1e-6)


def test_masking_truncated_completions_matches_trl():
    from trl import GRPOTrainer

    d = _batch(0)
    n = d["mask"].shape[0]
    eos, pad = 7, 0
    ids = [[3] * (int(d["mask"][i].sum()) - 1) + [eos if i % 3 else 5] for i in range(n)]  # every 3rd cut off
    me = SimpleNamespace(mask_truncated_completions=True, eos_token_ids=[eos],
                         _tokenizer=SimpleNamespace(pad_token_id=pad))
    scope = _trl_block(GRPOTrainer._generate_and_score_completions,
                       "# If mask_truncated_completions is enabled", "loss_mask = ",
                       self=me, completion_ids_list=ids, completion_mask=d["mask"], tool_mask=None, device="cpu")
    truncated = torch.tensor([i % 3 == 0 for i in range(n)])
    mask = mask_truncated(d["mask"], truncated)
    assert torch.equal(mask, scope["completion_mask"]) and mask.sum() < d["mask"].sum()
    adv = group_advantages(d["rewards"], G)
    want, want_grad, _ = _trl_loss("grpo", {**d, "mask": mask}, adv, 0.04, 0.0, (0.2, 0.2), None)
    logp = d["logp"].clone().requires_grad_()
    got, _ = grpo_loss(logp, d["old"], adv, mask, ref_logp=d["ref"], beta=0.04, kl_kind="k3",
                       mode="seq-mean-token-mean")
    got.backward()
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logp.grad, want_grad, rtol=0, atol=1e-6)
