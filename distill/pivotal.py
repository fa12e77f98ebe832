"""Pivotal Token Search, the maths: find the tokens of a solution that move its chance of success.

Phi-4 (arXiv 2412.08905, section 4.3 and Figure 4; docs/recipes.md §5): for a problem Q and a solution T sampled from
the model being trained, token t_i is *pivotal* when p(success | Q, t_1..t_i) differs from
p(success | Q, t_1..t_{i-1}) by at least `p_gap`. Each p is estimated by sampling completions of the
prefix and verifying them, so the search subdivides instead of scanning: a span whose two ends
differ by less than `p_gap` is taken to hold no pivot; any other span is split and both halves are
searched. The split point is where the span's cumulative token log-probability reaches half its
total, not the token-count midpoint, so an unlikely token (a likely decision) is isolated in a
few splits. Estimates are kept by token-id prefix, never by text.

Each pivot gives one pair at the prefix before it: the solution's token and a token that moved p
the other way, taken from the completions already sampled to estimate p there (the paper's
footnote), so pairs cost no further model calls. The paper publishes neither `p_gap` nor the
samples per estimate (distill.pts makes both configuration).

Pure: every p is given by the caller; nothing here samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple, Sequence

from reason.passk import EPS

Span = tuple[int, int]  # [a, b): tokens a..b-1 of a solution; its ends are the prefixes of length a and b


def split_point(logprobs: Sequence[float], a: int, b: int) -> int:
    """Where span [a, b) splits: just after the token at which the span's cumulative -log p reaches
    half its total, kept inside (a, b); the token-count midpoint when every token had p = 1.

    >>> split_point([-0.01, -0.01, -2.0, -0.01], 0, 4)  # the unlikely token ends the left half
    3
    >>> split_point([-0.01, -2.0], 0, 2), split_point([-1.0] * 4, 0, 4), split_point([0.0] * 5, 0, 5)
    (1, 2, 2)
    """
    if b - a < 2:
        raise ValueError(f"span [{a}, {b}) has fewer than 2 tokens; it cannot be split")
    mass = [max(0.0, -lp) for lp in logprobs[a:b]]  # a log-prob above 0 is rounding
    total = sum(mass)
    if total <= 0.0:
        return (a + b) // 2
    for k, cum in enumerate(accumulate(mass)):
        if cum >= total / 2 * (1 - EPS):
            return min(a + k + 1, b - 1)
    return b - 1  # unreachable: the last token brings cum to total


def search_round(spans: Sequence[Span], p: dict[int, float], logprobs: Sequence[float],
                 p_gap: float) -> tuple[list[Span], list[int]]:
    """One level of the subdivision, over spans whose ends are all in `p` (prefix length -> p):
    (the spans to search next, the pivots found, as token positions).

    >>> search_round([(0, 4)], {0: 0.5, 4: 1.0}, [-0.01, -0.01, -0.7, -0.01], 0.2)
    ([(0, 3), (3, 4)], [])
    >>> search_round([(0, 2), (2, 3)], {0: 0.5, 2: 0.55, 3: 1.0}, [-0.01, -0.01, -0.7], 0.2)
    ([], [2])
    """
    nxt, pivots = [], []
    for a, b in spans:
        if abs(p[b] - p[a]) < p_gap - EPS:
            continue  # the ends agree: no pivot here (the paper's rule, even if two cancel inside)
        if b - a == 1:
            pivots.append(a)
            continue
        m = split_point(logprobs, a, b)
        nxt += [(a, m), (m, b)]
    return nxt, pivots


@dataclass
class PivotSearch:
    """The subdivision of one n-token solution, a round at a time, so that many searches (of many
    problems) can share one engine call per round. p[0] is p(success | Q); p[n] is the solution's
    own verdict (1.0 or 0.0), known without sampling."""

    logprobs: list[float]
    p_gap: float
    p: dict[int, float]
    spans: list[Span] = field(default_factory=list)
    pivots: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, logprobs: Sequence[float], p_gap: float, p_start: float, p_end: float) -> "PivotSearch":
        n = len(logprobs)
        if n == 0:
            raise ValueError("a solution with no tokens has nothing to search")
        return cls(list(logprobs), p_gap, {0: p_start, n: p_end}, [(0, n)])

    @property
    def done(self) -> bool:
        return not self.spans

    def wanted(self) -> list[int]:
        """The prefix lengths whose p the next round needs (sorted)."""
        return sorted({end for span in self.spans for end in span} - set(self.p))

    def advance(self, p: dict[int, float]) -> None:
        """Take the estimates of `wanted()` and run one round."""
        self.p.update(p)
        self.spans, found = search_round(self.spans, self.p, self.logprobs, self.p_gap)
        self.pivots = sorted(self.pivots + found)


def scan_cost(solutions: Sequence[Sequence[int]]) -> int:
    """Estimates a token-by-token scan of these solutions would need: every distinct proper prefix
    (the empty one included; the whole solution's p is its verdict).

    >>> scan_cost([[1, 2, 3], [1, 2, 4, 5]])  # (), (1,), (1, 2) shared; (1, 2, 4) its own
    4
    """
    return len({tuple(s[:k]) for s in solutions for k in range(len(s))})


# ---------------------------------------------------------------- the pair at a pivot

class Other(NamedTuple):
    """The token set against the pivot: its success rate among the completions that began with it."""

    token: int
    rate: float
    count: int


def first_token_rates(completions: Sequence[tuple[Sequence[int], bool | None]]) -> dict[int, tuple[float, int]]:
    """Success rate and count of the verified completions, by their first token.

    >>> first_token_rates([([5, 1], True), ([6], False), ([5], True), ([6, 2], None), ([], False)])
    {5: (1.0, 2), 6: (0.0, 1)}
    """
    seen: dict[int, list[bool]] = {}
    for ids, ok in completions:
        if ids and ok is not None:
            seen.setdefault(ids[0], []).append(ok)
    return {t: (sum(v) / len(v), len(v)) for t, v in seen.items()}


def pick_pair(token: int, p_before: float, p_after: float,
              completions: Sequence[tuple[Sequence[int], bool | None]]) -> tuple[int, int, Other] | None:
    """(chosen, rejected, the other token) for the pivot `token` at a prefix with p = `p_before`.

    A pivot that raised p is chosen, against the sampled first token with the lowest success rate
    below `p_before`; one that lowered p is rejected, against the one with the highest rate above
    it (ties: the more frequent, then the lower id). None when no completion's first token moved p
    the other way. `completions` are the ones sampled at this prefix: (token ids, verified correct).
    >>> pick_pair(5, 0.5, 1.0, [([5], True), ([6], False), ([7], False), ([6], False)])
    (5, 6, Other(token=6, rate=0.0, count=2))
    >>> pick_pair(6, 0.5, 0.0, [([5], True), ([6], False)]), pick_pair(6, 0.5, 0.0, [([6], False)])
    ((5, 6, Other(token=5, rate=1.0, count=1)), None)
    """
    raised = p_after > p_before
    others = [Other(t, rate, n) for t, (rate, n) in first_token_rates(completions).items()
              if t != token and (rate < p_before - EPS if raised else rate > p_before + EPS)]
    best = min(others, key=lambda o: (o.rate if raised else -o.rate, -o.count, o.token), default=None)
    if best is None:
        return None
    return (token, best.token, best) if raised else (best.token, token, best)
