"""pass@k and maj@k from n samples per problem: the maths of the Phi-4 eval protocol.

Phi-4-reasoning reports pass@1 averaged over several samples per problem (50 for
AIME, 5 elsewhere; RECIPES.md section 2). `pass_at_k` is the unbiased estimator
of Chen et al. 2021 (arXiv 2107.03374), `pass1_mean` the averaged pass@1, and
`maj_at_k` majority voting over the extracted final answers.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c correct.

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) so large
    n never overflows.

    >>> round(pass_at_k(5, 2, 1), 9), pass_at_k(5, 0, 3), pass_at_k(5, 3, 3)
    (0.4, 0.0, 1.0)
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):  # empty when c == 0
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass1_mean(correct: Sequence[bool | float]) -> float:
    """pass@1 averaged over one problem's n samples (= pass_at_k(n, c, 1))."""
    if not correct:
        raise ValueError("no samples")
    return sum(float(x) for x in correct) / len(correct)


_LATEX_FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def normalize_answer(answer: str) -> str:
    """A canonical vote key: the exact value for plain numbers, else squashed text.

    "0.5", "1/2" and "\\frac{1}{2}" all become "1/2"; "1,000" becomes "1000".
    Anything that is not a plain number is compared as text without spaces,
    `$` signs or a trailing period.
    """
    text = answer.strip().strip("$").replace(" ", "").rstrip(".")
    frac = _LATEX_FRAC.fullmatch(text)
    if frac:
        text = f"{frac[1]}{frac[2]}/{frac[3]}"
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return text
    return str(value)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 if the most common answer among the first k samples is correct, else 0.0.

    `answers` are the extracted final answers (None: none found; such samples do not
    vote), `correct` the verifier's verdicts. All correct answers vote together:
    the verifier already found them equal to the ground truth, hence to each other,
    however they are written. Wrong answers vote by `normalize_answer`. Ties go to
    the answer that appeared first among the k samples. No votes at all -> 0.0.

    >>> maj_at_k(["3", "4", "4.0", "3"], [True, False, False, True], 4)  # tie 2-2: "3" came first
    1.0
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    votes: dict[tuple, int] = {}  # insertion order = first appearance, for ties
    for answer, ok in zip(answers[:k], correct[:k]):
        if answer is None and not ok:
            continue
        key = ("correct",) if ok else ("wrong", normalize_answer(answer))
        votes[key] = votes.get(key, 0) + 1
    if not votes:
        return 0.0
    winner = max(votes, key=votes.get)  # max keeps the first of equal counts
    return float(winner == ("correct",))
