"""Repeated n-gram penalty R_rep <= 0 of the Phi-4-reasoning-plus reward.

Phi-4-reasoning-plus (arXiv 2504.21318; docs/recipes.md §2): R = (8/13) R_acc_scaled +
(1/13) R_rep, where R_rep penalises repeated 5-grams. The exact form is UNCONFIRMED (the
report describes it in words); this is the form docs/recipes.md §2 records, with n and
the threshold as arguments:

    R_rep = -max(#distinct n-grams seen more than `threshold` times / #n-grams,
                 largest n-gram count / (#words / n)),

0 when no n-gram occurs more than `threshold` times, clamped to [-1, 0]. The second
term is 1 for a text that loops on one n-word phrase, whatever its length.
"""
from __future__ import annotations

from collections import Counter


def repetition_penalty(text: str, n: int = 5, threshold: int = 5) -> float:
    """Penalty in [-1, 0] for word n-grams repeated more than `threshold` times.

    Words are whitespace-split and case-sensitive. Linear time: one pass to count
    n-grams, so a 1 MB degenerate rollout costs well under a second.

    >>> repetition_penalty("the answer is four because two plus two is four")
    0.0
    >>> repetition_penalty("I will check again. " * 40)
    -1.0
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")

    words = text.split()
    total = len(words) - n + 1  # number of n-grams
    if total <= 0:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    repeated = [c for c in counts.values() if c > threshold]
    if not repeated:
        return 0.0
    spread = len(repeated) / total
    loop = max(repeated) / (len(words) / n)
    return -min(1.0, max(spread, loop))
