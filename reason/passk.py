"""pass@k and maj@k from n samples per problem: the maths of the Phi-4 eval protocol.

Phi-4-reasoning reports pass@1 averaged over several samples per problem (50 for
AIME, 5 elsewhere; arXiv 2504.21318 section 5). `pass_at_k` is the unbiased estimator
of Chen et al. 2021 (arXiv 2107.03374), `pass1_mean` the averaged pass@1, and
`maj_at_k` majority voting over equivalence classes of the extracted final answers
(`plurality`, which teachable-prompt selection uses too).
"""
from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import Callable, Sequence


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


def mean(values) -> float | None:
    """The mean of `values` as floats; None when there are none."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


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
    return str(Fraction(text)) if is_number(text) else text


EPS = 1e-9  # rates are k/n floats: compare them to band edges and bin edges with this slack


def band_verdict(rate: float, band: tuple[float, float]) -> tuple[str, str] | None:
    """None inside the pass-rate band (edges included), else (too_hard | too_easy, why).

    Teachable-prompt selection (open-r1's [0.1, 0.6]) and GRPO's prompt filtering
    (Phi-4-mini drops all-right and all-wrong groups) both use it.
    >>> band_verdict(0.5, (0.1, 0.6)), band_verdict(1.0, (0.125, 0.875))
    (None, ('too_easy', 'pass rate 1.000 > 0.875'))
    """
    low, high = band
    if not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= low <= high <= 1, got {list(band)}")
    if not 0 <= rate <= 1:
        raise ValueError(f"a pass rate must be in [0, 1], got {rate}")
    if rate < low - EPS:
        return "too_hard", f"pass rate {rate:.3f} < {low}"
    if rate > high + EPS:
        return "too_easy", f"pass rate {rate:.3f} > {high}"
    return None


def is_number(key: str) -> bool:
    """True for a `normalize_answer` key that is a plain number: two distinct ones are never equal."""
    try:
        Fraction(key)
    except (ValueError, ZeroDivisionError):
        return False
    return True


def vote_keys(answers: Sequence[str | None]) -> list[str | None]:
    """Group keys: `normalize_answer` of each answer (None stays None)."""
    return [None if a is None else normalize_answer(a) for a in answers]


def _ranked(keys: Sequence[str | None]) -> list[str]:
    """Distinct keys, most frequent first, ties in order of first appearance."""
    counts = Counter(k for k in keys if k is not None)
    return sorted(counts, key=lambda k: -counts[k])  # sorted is stable; Counter keeps first-seen order


def equivalence_pairs(keys: Sequence[str | None]) -> list[tuple[str, str]]:
    """The (earlier, later) key pairs `plurality` may ask `same` about.

    Pairs of two plain numbers are left out: `normalize_answer` already made equal numbers equal keys.
    """
    ranked = _ranked(keys)
    return [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if not (is_number(a) and is_number(b))]


def plurality(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None
              ) -> tuple[int | None, int]:
    """(index of the first sample of the plurality answer, its votes); (None, 0) when none voted.

    Answers are grouped by `normalize_answer`; `same(a, b)` (keys, `a` the more frequent)
    may merge two groups whose keys are not both plain numbers, e.g. by math-verify. A
    sample with no answer (None) votes for nothing. Ties go to the answer seen first.

    >>> plurality(["3", "1/2", "0.5", None])
    (1, 2)
    """
    keys = vote_keys(answers)
    counts = Counter(k for k in keys if k is not None)
    clusters: list[list] = []  # [representative key, first index, votes], in creation order
    for key in _ranked(keys):
        for c in clusters:
            if same is not None and not (is_number(c[0]) and is_number(key)) and same(c[0], key):
                c[1], c[2] = min(c[1], keys.index(key)), c[2] + counts[key]
                break
        else:
            clusters.append([key, keys.index(key), counts[key]])
    if not clusters:
        return None, 0
    _, first, votes = max(clusters, key=lambda c: (c[2], -c[1]))  # most votes, then the earliest answer
    return first, votes


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int,
             same: Callable[[str, str], bool] | None = None) -> float:
    """1.0 if the plurality answer among the first k samples is correct, else 0.0.

    The standard definition: answers vote by equivalence class (`plurality`, with the
    verifier as `same`), and the winning class is scored by its first sample's verdict.
    Correct answers do not vote as one bloc: that would count "4" and "2^2" together
    while wrong answers split by form, and read high. Ties go to the answer that appeared
    first; samples without an answer do not vote; no votes at all -> 0.0.

    >>> maj_at_k(["2^2", "4", "5", "5"], [True, True, False, False], 4)  # "5" has 2 votes
    0.0
    >>> maj_at_k(["2^2", "4", "5", "5"], [True, True, False, False], 4, same=lambda a, b: {a, b} == {"2^2", "4"})
    1.0
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    first, _ = plurality(answers[:k], same)
    return 0.0 if first is None else float(correct[first])


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-problem values, resampling problems.

    For one stage the values are each problem's pass@1; for a paired comparison of two
    stages on the same problems, each problem's difference (Efron & Tibshirani 1993,
    ch. 13): pairing removes the problem-to-problem spread both stages share. Seeded, so
    a report is the same twice.

    >>> bootstrap_ci([1.0] * 10)
    (1.0, 1.0)
    >>> lo, hi = bootstrap_ci([0.0, 1.0] * 200); 0.44 < lo < 0.5 < hi < 0.56
    True
    """
    import numpy as np

    v = np.asarray(values, dtype=float)  # [P]
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))].mean(axis=1)  # [R]
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)
