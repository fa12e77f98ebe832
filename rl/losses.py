"""GRPO maths as pure functions: advantages, KL, importance weights, the clipped loss.

Paper knobs implemented here:
- GRPO (DeepSeekMath, arXiv 2402.03300): group-relative advantages
  (r - mean) / std, the PPO clipped surrogate, a KL penalty to a reference policy
  estimated per token with Schulman's k3.
- Dr.GRPO (arXiv 2503.20783): no std division (`scale="none"`) and a constant
  length normaliser (`mode="seq-mean-token-sum-norm"`).
- DAPO (arXiv 2503.14476): clip-higher (`clip_high > clip_low`) and token-mean
  aggregation.
- Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"): per-token weights
  min(pi_trainer / pi_rollout, cap) correct the mismatch between the rollout
  engine's numerics (vLLM) and the trainer's.
- Masked importance sampling at the sequence level (TRL's default
  `vllm_importance_sampling_mode="sequence_mask"`): one weight exp(sum of the token
  log-ratios) per sequence, and 0 for a sequence whose weight exceeds the cap.
- GSPO (arXiv 2507.18071, eq. 5-7): a sequence-level ratio
  s_i = exp(mean_t log(pi / pi_old)), clipped per sequence, on every token of it.
- DAPO's overlong filtering (arXiv 2503.14476, section 3.4; TRL
  `mask_truncated_completions`): a completion cut off at the length limit gets no loss.
- Phi-4-reasoning-plus (arXiv 2504.21318; docs/recipes.md §2) was trained with verl: KL
  coefficient beta = 0.001, entropy bonus gamma = 0.001, clip 0.2 (verl's default).
  Aggregation modes and KL kinds use verl's names so recipes map 1:1.

Shapes: B sequences (prompts x G samples), T response tokens, V vocabulary.
"""
from __future__ import annotations

import torch


ADV_SCALES = ("std", "none")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
RATIO_LEVELS = ("token", "sequence")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's std when scale="std".

    Rows are laid out group after group: rewards[g*G:(g+1)*G] are the G samples of
    prompt g. The std is the unbiased (Bessel, N-1) sample std, as both TRL
    (`nanstd`) and verl (`torch.std`) use; `eps` is added to the std (verl's 1e-6;
    TRL adds 1e-4). A group whose rewards are all equal gets advantage 0.

    >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 2, scale="none").tolist()
    [0.5, -0.5, -0.5, 0.5]
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"scale must be one of {ADV_SCALES}, got {scale!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)  # [B, G]
    r = r if r.is_floating_point() else r.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)  # [B*G]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi: [B, T] -> [B, T].

    With log r = ref_logp - logp, Schulman's estimators ("Approximating KL
    divergence", 2020) are k1 = -log r (unbiased, can be negative),
    k2 = (log r)^2 / 2 (biased, low variance) and k3 = (r - 1) - log r (unbiased,
    never negative; GRPO's choice and TRL's). "low_var_kl" is verl's k3: log r
    clamped to [-20, 20] before the exp and the result clamped to [-10, 10].
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    if kind == "low_var_kl":
        log_r = log_r.clamp(-20.0, 20.0)
        return (torch.expm1(log_r) - log_r).clamp(-10.0, 10.0)
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance-sampling weights min(pi_old / pi_rollout, cap): [B, T], no grad.

    `old_logp` are the trainer's log-probs of the sampled tokens before the update,
    `rollout_logp` what the rollout engine reported for the same tokens. The cap
    bounds the variance a few badly mismatched tokens could add (Yao et al.).
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def sequence_mask_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                          cap: float = 3.0) -> torch.Tensor:
    """Sequence-level masked importance sampling (TRL's "sequence_mask"): [B, T] weights, no grad.

    Each sequence's weight is w = exp(sum over its tokens of old_logp - rollout_logp),
    on every token of it, and 0 where w > cap: a sequence the engine sampled from a
    distribution too far from the trainer's is dropped rather than down-weighted
    (its tokens still count in the loss normaliser, as in TRL).

    >>> old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    >>> sequence_mask_weights(old, old - torch.tensor([[0.5, 0.0], [0.5, 0.7]]), torch.ones(2, 2)).tolist()
    [[1.6487212181091309, 1.6487212181091309], [0.0, 0.0]]
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_w = torch.where(mask.bool(), old_logp - rollout_logp, torch.zeros_like(old_logp)).sum(-1, keepdim=True)
    w = torch.exp(log_w)  # [B, 1]; an overflow to inf is above any cap
    return torch.where(w <= cap, w, torch.zeros_like(w)).expand_as(old_logp).detach()


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The loss mask without truncated completions: [B, T] and [B] bool -> [B, T].

    A completion cut off at the length limit never reached its answer; its reward
    says nothing about its tokens. Its sequence still counts in the means over
    sequences (as 0), as in TRL.

    >>> mask_truncated(torch.ones(2, 2), torch.tensor([False, True])).tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """
    return mask * (~truncated.bool())[:, None].to(mask.dtype)


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """log(pi / pi_old) per token [B, T], or its mean over each sequence's tokens on every token (GSPO).

    Clamped to [-20, 20] as verl does, so one wild token cannot overflow the exp.
    The sequence mean keeps its graph: every token of a sequence gets the gradient
    of s_i = exp(mean log ratio), which is GSPO's (and equals GSPO-token's).

    >>> log_ratio(torch.tensor([[0.3, 0.1, 9.0]]), torch.zeros(1, 3), torch.tensor([[1, 1, 0]]), "sequence").tolist()
    [[0.20000000298023224, 0.20000000298023224, 0.20000000298023224]]
    """
    if level not in RATIO_LEVELS:
        raise ValueError(f"level must be one of {RATIO_LEVELS}, got {level!r}")
    diff = logp - old_logp  # [B, T]
    if level == "sequence":
        m = mask.bool()
        mean = torch.where(m, diff, torch.zeros_like(diff)).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        diff = mean.expand_as(diff)  # [B, T]
    return diff.clamp(-20.0, 20.0)


def _masked_stats(ratio, adv, mask, clip_low, clip_high) -> dict[str, torch.Tensor]:
    """Clip fractions and ratio mean/max over the tokens in mask (detached)."""
    m = mask.bool()
    n = m.sum().clamp(min=1).to(ratio.dtype)
    high = (ratio > 1 + clip_high) & (adv > 0) & m  # [B, T]
    low = (ratio < 1 - clip_low) & (adv < 0) & m
    masked = torch.where(m, ratio, torch.zeros_like(ratio))  # ratio > 0, so 0 never wins the max
    return {
        "clip_fraction": (high | low).sum() / n,
        "clip_high_fraction": high.sum() / n,
        "clip_low_fraction": low.sum() / n,
        "ratio_mean": masked.sum() / n,
        "ratio_max": masked.max(),
    }


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weights: torch.Tensor | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, negated: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A).

    r = exp(log_ratio(logp, old_logp, mask, level)): per token, or GSPO's one ratio
    per sequence (level="sequence"). `advantages` is [B] (one per sequence) or
    [B, T]. clip_high > clip_low is DAPO's clip-higher. `is_weights` (see
    `tis_weights`, `sequence_mask_weights`) multiply the per-token loss. Returns the per-token loss [B, T]
    and detached stats over `mask`: clip_fraction (tokens whose gradient the clip
    removes: r > 1 + clip_high with A > 0, or r < 1 - clip_low with A < 0), its
    high/low parts, ratio_mean and ratio_max.
    """
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    ratio = torch.exp(log_ratio(logp, old_logp, mask, level))  # [B, T]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    if is_weights is not None:
        loss = loss * is_weights
    return loss, _masked_stats(ratio.detach(), adv, mask, clip_low, clip_high)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", max_len: int | None = None):
    """Reduce a per-token [B, T] loss to a scalar over the tokens in mask.

    - "token-mean": sum / tokens in the batch (DAPO; TRL "bnpo" and "dapo").
    - "seq-mean-token-mean": mean over sequences of each one's token mean
      (original GRPO; TRL "grpo").
    - "seq-mean-token-sum": mean over sequences of each one's token sum (TRL "luspo").
    - "seq-mean-token-sum-norm": sum / (B * max_len), a constant normaliser
      (Dr.GRPO; TRL "dr_grpo"). Pass the generation budget as max_len so it does
      not vary with the batch; it defaults to T. verl's mode of this name divides
      by max_len only, so it is B times this value.
    Masked positions may hold anything, inf and nan included: they are selected
    out, not multiplied by 0. A sequence with no tokens counts as 0 in the means.
    """
    m = mask.bool()
    x = torch.where(m, per_token, torch.zeros_like(per_token))  # [B, T]
    if mode == "token-mean":
        return x.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (x.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum":
        return x.sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        norm = x.shape[-1] if max_len is None else max_len
        if norm < x.shape[-1]:
            raise ValueError(f"max_len {norm} is shorter than the batch's {x.shape[-1]} tokens")
        return x.sum() / (x.shape[0] * norm)
    raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    beta: float = 0.0,
    gamma: float = 0.0,
    kl_kind: str = "low_var_kl",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weights: torch.Tensor | None = None,
    mode: str = "token-mean",
    max_len: int | None = None,
    ratio_level: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = agg(policy loss) + beta * agg(KL(pi || ref)) - gamma * agg(entropy).

    All three terms use the same aggregation `mode`, as verl does (TRL averages its
    entropy bonus over tokens whatever its loss type). The importance weights act
    on the policy term only; `ratio_level="sequence"` is GSPO's ratio (the KL stays
    per token, as in TRL and verl). `ref_logp` is needed when beta > 0, `entropy` (from
    `reason.logprobs`, with its graph) when gamma > 0; given with a zero
    coefficient they are only logged. Metrics are python floats: loss,
    policy_loss (aggregated), kl and entropy (token means over mask, only when
    their inputs are given), clip_fraction, clip_high_fraction,
    clip_low_fraction, ratio_mean, ratio_max.
    """
    if beta < 0 or gamma < 0:
        raise ValueError(f"beta and gamma must be >= 0, got {beta}, {gamma}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if gamma > 0 and entropy is None:
        raise ValueError("gamma > 0 needs entropy")
    per_token, stats = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, is_weights, ratio_level)
    pg = aggregate(per_token, mask, mode, max_len)
    metrics = {"policy_loss": pg, **stats}
    loss = pg
    kl = None if ref_logp is None else kl_estimate(logp, ref_logp, kl_kind)  # [B, T]
    for name, term, coef in (("kl", kl, beta), ("entropy", entropy, -gamma)):
        if term is not None:
            metrics[name] = aggregate(term, mask, "token-mean")
            if coef:
                loss = loss + coef * aggregate(term, mask, mode, max_len)
    metrics["loss"] = loss
    return loss, {k: float(v.detach()) for k, v in metrics.items()}
