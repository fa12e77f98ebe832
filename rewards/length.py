"""Length-shaped rewards: Phi-4-reasoning-plus's length-aware accuracy, and two peers'.

- `length_aware_accuracy` / `phi4_accuracy_scaled`: R_acc_scaled of Phi-4-reasoning-plus
  (arXiv 2504.21318; docs/recipes.md §2): cosine length scaling of the {0, 1} accuracy with
  L_max = 31,744, L_pos = 25,600, L_neg = 3,702, then the format overrides.
- `dapo_overlong_penalty`: DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).
- `cosine_length_reward`: the cosine-scaled reward of "Demystifying Long CoT"
  (arXiv 2502.03373) with open-r1's semantics.

Every length here is a count of response TOKENS (a peer counted characters, which silently
rescales every length knob); counts that are not non-negative ints are rejected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral


def _tokens(value, name: str = "num_tokens") -> int:
    """A non-negative int token count (bools and floats are rejected)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int token count, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be bool, got {type(value).__name__}")
    return value


def _cosine(at_zero: float, at_one: float, rho: float) -> float:
    """Half a cosine from `at_zero` (rho = 0) to `at_one` (rho = 1)."""
    return at_one + 0.5 * (at_zero - at_one) * (1.0 + math.cos(math.pi * rho))


@dataclass(frozen=True)
class LengthSpec:
    """Knobs of R_acc_scaled; defaults are the Phi-4-reasoning-plus values.

    `r_truncated` and `r_bad_format` are the format overrides (no EOS; missing or
    malformed think block).
    """

    l_max: int = 31_744
    l_pos: int = 25_600
    l_neg: int = 3_702
    r_pos_max: float = 1.0
    r_pos_min: float = 0.5
    r_neg_max: float = -0.5
    r_neg_min: float = -1.0
    r_truncated: float = -0.5
    r_bad_format: float = -1.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("l_"):
                _tokens(value, f.name)
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if not 0 <= self.l_pos < self.l_max:
            raise ValueError(f"need 0 <= l_pos < l_max, got l_pos={self.l_pos}, l_max={self.l_max}")
        if self.l_neg <= 0:
            raise ValueError(f"l_neg must be > 0, got {self.l_neg}")
        if not self.r_neg_min <= self.r_neg_max <= self.r_pos_min <= self.r_pos_max:
            # Otherwise a wrong answer could outscore a right one, or a band runs backwards.
            raise ValueError(
                "need r_neg_min <= r_neg_max <= r_pos_min <= r_pos_max, got "
                f"{self.r_neg_min}, {self.r_neg_max}, {self.r_pos_min}, {self.r_pos_max}"
            )


def length_aware_accuracy(correct: bool, num_tokens: int, spec: LengthSpec = LengthSpec()) -> float:
    """Phi-4-reasoning-plus length scaling of a {0, 1} accuracy.

    Correct: r_pos_max up to l_pos tokens, then a half cosine down to r_pos_min at
    l_max (and beyond). Incorrect: r_neg_min at 0 tokens, a half cosine up to
    r_neg_max at l_neg and beyond, so a wrong answer that thought longer loses less.

    >>> length_aware_accuracy(True, 28_672), length_aware_accuracy(False, 3_702)
    (0.75, -0.5)
    """
    n = _tokens(num_tokens)
    if _flag(correct, "correct"):
        rho = min(1.0, max(n - spec.l_pos, 0) / (spec.l_max - spec.l_pos))
        return _cosine(spec.r_pos_max, spec.r_pos_min, rho)
    rho = min(1.0, n / spec.l_neg)
    return _cosine(spec.r_neg_min, spec.r_neg_max, rho)


def phi4_accuracy_scaled(
    correct: bool, num_tokens: int, truncated: bool, think_ok: bool, spec: LengthSpec = LengthSpec()
) -> float:
    """R_acc_scaled: `length_aware_accuracy` unless a format override applies.

    Truncated (no EOS) -> r_truncated (-0.5); else a missing or malformed think block
    -> r_bad_format (-1.0). Truncation wins when both hold: a response cut at the
    length limit almost never has its `</think>` yet, so if the format rule came first
    the paper's -0.5 for truncation would practically never apply.

    >>> phi4_accuracy_scaled(True, 1_000, truncated=False, think_ok=True)
    1.0
    >>> phi4_accuracy_scaled(False, 31_744, truncated=True, think_ok=False)
    -0.5
    """
    # Check every input up front, so a bad call fails even when an override decides.
    _flag(correct, "correct")
    _flag(think_ok, "think_ok")
    _tokens(num_tokens)
    if _flag(truncated, "truncated"):
        return spec.r_truncated
    if not think_ok:
        return spec.r_bad_format
    return length_aware_accuracy(correct, num_tokens, spec)


def dapo_overlong_penalty(num_tokens: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment: 0 up to max_len - cache_len tokens, then linear
    down to -1 at max_len, and -1 beyond (cache_len = 0 makes it a hard step).

    >>> dapo_overlong_penalty(90, max_len=100, cache_len=20)
    -0.5
    """
    n = _tokens(num_tokens)
    max_len, cache_len = _tokens(max_len, "max_len"), _tokens(cache_len, "cache_len")
    if max_len == 0 or cache_len > max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len and max_len > 0, got {cache_len}, {max_len}")
    start = max_len - cache_len
    if n <= start:
        return 0.0
    if n <= max_len:
        return (start - n) / cache_len
    return -1.0


def cosine_length_reward(
    correct: bool,
    num_tokens: int,
    max_len: int,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
) -> float:
    """Cosine-scaled reward with open-r1's `get_cosine_scaled_reward` semantics.

    progress = num_tokens / max_len; a correct answer goes from max_value_correct at
    0 tokens to min_value_correct at max_len, a wrong one from min_value_wrong at 0
    to max_value_wrong at max_len. As in open-r1, progress is NOT clamped: past
    max_len the cosine comes back round (open-r1 issue #312), so set max_len to the
    generation limit. Unlike open-r1 (characters), the length is in tokens.

    >>> cosine_length_reward(True, 500, max_len=1000), cosine_length_reward(False, 0, max_len=1000)
    (0.75, -1.0)
    """
    n = _tokens(num_tokens)
    if _tokens(max_len, "max_len") == 0:
        raise ValueError("max_len must be > 0")
    rho = n / max_len
    if _flag(correct, "correct"):
        return _cosine(max_value_correct, min_value_correct, rho)
    return _cosine(min_value_wrong, max_value_wrong, rho)
