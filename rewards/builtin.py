"""The built-in rewards, registered under the `reason.rewards` entry points.

Each is a plain function of the completion and the problem's fields (TRL style,
one sample at a time) returning a dict of float components with "score", or None
to skip a sample whose ground truth cannot be used. Fields they read:
`ground_truth`, `num_tokens` (the completion's TOKEN count), `finish_reason`
("stop" | "length"). Everything else is ignored.

- `accuracy`: 1 / 0 from the final answer (last `\\boxed{}`, else an "Answer:" line).
- `phi4_plus`: Phi-4-reasoning-plus, arXiv 2504.21318 section 4:
  (8/13) * length-aware accuracy (with format overrides) + (1/13) * 5-gram repetition.
- `plus_minus_one`: Phi-4-mini-reasoning stage 4, arXiv 2504.21233: +1 correct, -1 otherwise.
- `think_format`, `repetition`, `dapo_overlong` (DAPO), `cosine` (open-r1 / TRL).

>>> accuracy("<think>2+2</think> So \\\\boxed{4}", ground_truth="4")["score"]  # doctest: +SKIP
1.0
"""
from __future__ import annotations

from rewards.format import answer_text, is_truncated, parse_think
from rewards.length import (
    LengthSpec,
    cosine_length_reward,
    dapo_overlong_penalty,
    phi4_accuracy_scaled,
)
from rewards.math import Verdict, check_answer
from rewards.repetition import repetition_penalty


def _verdict(completion: str, ground_truth: str | None, think_close: str, timeout: float) -> Verdict:
    if ground_truth is None or not str(ground_truth).strip():
        return Verdict("bad_gold")
    return check_answer(answer_text(completion, think_close), str(ground_truth), timeout=timeout)


def _num_tokens(num_tokens, reward: str) -> int:
    if num_tokens is None:
        raise ValueError(f"reward '{reward}' needs num_tokens (the completion's token count; "
                         "lengths are counted in tokens, not characters)")
    return num_tokens


def accuracy(completion: str, ground_truth: str | None = None, think_close: str = "</think>",
             timeout: float = 5.0, **_) -> dict | None:
    """1.0 if the final answer equals the ground truth, else 0.0; None if the gold is unusable."""
    v = _verdict(completion, ground_truth, think_close, timeout)
    if v.status == "bad_gold":
        return None
    return {"score": float(v.correct), "acc": float(v.correct)}


def plus_minus_one(completion: str, ground_truth: str | None = None, think_close: str = "</think>",
                   timeout: float = 5.0, **_) -> dict | None:
    """Phi-4-mini stage 4: +1 correct, -1 otherwise."""
    v = _verdict(completion, ground_truth, think_close, timeout)
    if v.status == "bad_gold":
        return None
    return {"score": 1.0 if v.correct else -1.0, "acc": float(v.correct)}


def think_format(completion: str, think_open: str = "<think>", think_close: str = "</think>",
                 **_) -> dict:
    """1.0 for exactly one non-empty think block followed by a solution, else 0.0."""
    return {"score": float(parse_think(completion, think_open, think_close).ok)}


def repetition(completion: str, n: int = 5, threshold: int = 5, **_) -> dict:
    """The 5-gram repetition penalty alone (<= 0)."""
    return {"score": repetition_penalty(completion, n=n, threshold=threshold)}


_PLUS = LengthSpec()


def phi4_plus(completion: str, ground_truth: str | None = None, num_tokens: int | None = None,
              finish_reason: str | None = None, think_open: str = "<think>",
              think_close: str = "</think>", w_acc: float = 8 / 13, w_rep: float = 1 / 13,
              timeout: float = 5.0, l_max: int = _PLUS.l_max, l_pos: int = _PLUS.l_pos, l_neg: int = _PLUS.l_neg,
              r_pos_max: float = _PLUS.r_pos_max, r_pos_min: float = _PLUS.r_pos_min,
              r_neg_max: float = _PLUS.r_neg_max, r_neg_min: float = _PLUS.r_neg_min,
              r_truncated: float = _PLUS.r_truncated, r_bad_format: float = _PLUS.r_bad_format,
              **_) -> dict | None:
    """Phi-4-reasoning-plus reward: w_acc * R_acc_scaled + w_rep * R_rep (LengthSpec's knobs by name)."""
    n = _num_tokens(num_tokens, "phi4_plus")
    length = LengthSpec(l_max, l_pos, l_neg, r_pos_max, r_pos_min, r_neg_max, r_neg_min, r_truncated, r_bad_format)
    think = parse_think(completion, think_open, think_close)
    v = _verdict(completion, ground_truth, think_close, timeout)
    if v.status == "bad_gold":
        return None
    if finish_reason is None:
        raise ValueError("reward 'phi4_plus' needs finish_reason ('stop' or 'length'): "
                         "a truncated response is scored differently")
    truncated = is_truncated(finish_reason)
    acc_scaled = phi4_accuracy_scaled(v.correct, n, truncated, think.ok, length)
    rep = repetition_penalty(completion)
    return {
        "score": w_acc * acc_scaled + w_rep * rep,
        "acc": float(v.correct),
        "acc_scaled": acc_scaled,
        "rep": rep,
        "format_ok": float(think.ok),
        "truncated": float(truncated),
    }


def dapo_overlong(completion: str, num_tokens: int | None = None, max_len: int = 20_480,
                  cache_len: int = 4_096, **_) -> dict:
    """DAPO soft overlong punishment (arXiv 2503.14476), to add to an accuracy reward."""
    return {"score": dapo_overlong_penalty(_num_tokens(num_tokens, "dapo_overlong"), max_len, cache_len)}


def cosine(completion: str, ground_truth: str | None = None, num_tokens: int | None = None,
           max_len: int = 1000, think_close: str = "</think>", timeout: float = 5.0,
           min_value_wrong: float = -1.0, max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
           max_value_correct: float = 1.0, **_) -> dict | None:
    """Cosine-scaled accuracy (arXiv 2502.03373), as open-r1 / TRL define it."""
    n = _num_tokens(num_tokens, "cosine")
    v = _verdict(completion, ground_truth, think_close, timeout)
    if v.status == "bad_gold":
        return None
    score = cosine_length_reward(v.correct, n, max_len, min_value_wrong, max_value_wrong, min_value_correct,
                                 max_value_correct)
    return {"score": score, "acc": float(v.correct)}
