"""Answers graded against labelled equivalence cases: per category, and against plain math-verify.

The categories the `accuracy` reward once got wrong (several boxed answers, number
formats, Python-style golds, an upright `\\mathrm{e}`) each have golden cases, right
and wrong; on the whole labelled set it must agree with the labels at least as often
as plain math-verify (`verify(parse(gold), parse(completion))`) does on the same
completions, through the same killable worker as every other reward.
"""
from __future__ import annotations

import pytest
from math_verify import parse, verify

from rewards.registry import RewardTerm
from rewards.score import Scorer

B = "\\boxed"
CASES = {  # category -> [(completion, gold, correct?)]
    "several boxes": [
        (f"The solutions are {B}{{(1, 2)}}, {B}{{(2, 1)}}.", "(1, 2), (2, 1)", True),
        (f"{B}{{(1, 2)}} and {B}{{(2, 1)}}", "\\{(1,2),(2,1)\\}", True),
        (f"x = {B}{{1}} and {B}{{2}} and {B}{{3}}", "1, 2, 3", True),
        (f"So $x={B}{{3}}$ or $x={B}{{-1}}$.", "-1, 3", True),
        (f"{B}{{1}}, {B}{{2}}", "1, 2, 3", False),  # a set with a member missing
        (f"First I guessed {B}{{5}}. Checking again, the answer is {B}{{4}}.", "4", True),  # not one answer
        (f"First I guessed {B}{{4}}. Checking again, the answer is {B}{{5}}.", "4", False),
        (f"{B}{{2}}", "1, 2", False),  # one member is not the set
    ],
    "number formats": [
        (f"{B}{{1 000}}", "1000", True),
        (f"{B}{{1\\,000}}", "1000", True),
        (f"{B}{{1000,99}}", "1000.99", True),
        (f"{B}{{1,22}}", "1.22", True),
        (f"{B}{{1,000}}", "1000", True),
        (f"{B}{{12 345 678}}", "12345678", True),
        (f"{B}{{1,23}}", "1.22", False),
        (f"{B}{{1 001}}", "1000", False),
    ],
    "python-style golds": [
        (f"{B}{{-\\frac{{3(h-1)(h+1)^4}}{{7}}}}", "-3*(h - 1)*(h + 1)**4/7", True),
        (f"{B}{{-3*(h - 1)*(h + 1)**4/7}}", "-3*(h - 1)*(h + 1)**4/7", True),
        (f"{B}{{x^2 + 1}}", "x**2 + 1", True),
        (f"{B}{{x**2 + 1}}", "x**2 + 1", True),
        (f"{B}{{2x^2}}", "2*x**2", True),
        (f"{B}{{x^2 + 2}}", "x**2 + 1", False),
    ],
    "upright e": [
        (f"{B}{{e^{{2}}}}", "\\mathrm{e}^{2}", True),
        (f"{B}{{\\mathrm{{e}}}}", "\\mathrm{e}", True),
        (f"{B}{{e}}", "\\mathrm{e}", True),
        (f"{B}{{\\frac{{e}}{{2}}}}", "\\frac{\\mathrm{e}}{2}", True),
        (f"{B}{{2}}", "\\mathrm{e}", False),
    ],
    "what math-verify already does well": [
        (f"{B}{{\\frac{{1}}{{2}}}}", "0.5", True),
        (f"{B}{{\\dfrac12}}", "\\frac{1}{2}", True),
        (f"{B}{{x = 2}}", "2", True),
        (f"{B}{{[2, 5)}}", "[2, 5)", True),
        (f"{B}{{(2, 5]}}", "[2, 5)", False),
        (f"{B}{{\\sqrt{{8}}}}", "2\\sqrt{2}", True),
        (f"{B}{{3\\pi}}", "3\\pi", True),
        (f"{B}{{\\pi}}", "3.14", False),
        (f"{B}{{Paris}}", "Paris", True),
        (f"{B}{{London}}", "Paris", False),
        (f"{B}{{\\text{{yes}}}}", "yes", True),
        (f"{B}{{10\\%}}", "10\\%", True),
        (f"{B}{{42}}", "42", True),
        (f"{B}{{41}}", "42", False),
        ("The answer is 42.", "42", False),  # no box, no "Answer:" line: no answer
        ("Answer: 42", "42", True),
    ],
}
LABELLED = [case for cases in CASES.values() for case in cases]


@pytest.fixture(scope="module")
def verdicts():
    with Scorer([RewardTerm(name="accuracy")], workers=1, timeout=30.0) as scorer:
        rows, _ = scorer.score([{"completion": c, "ground_truth": g} for c, g, _ in LABELLED])
    return [r["components"] is not None and r["components"]["acc"] == 1.0 for r in rows]


@pytest.mark.parametrize("category", list(CASES))
def test_golden_cases(category, verdicts):
    start = sum(len(CASES[c]) for c in list(CASES)[:list(CASES).index(category)])
    wrong = [(c, g, want) for (c, g, want), got in zip(CASES[category], verdicts[start:]) if got != want]
    assert not wrong, wrong


def test_agrees_with_the_labels_at_least_as_often_as_plain_math_verify(verdicts):
    ours = sum(got == want for got, (_, _, want) in zip(verdicts, LABELLED))
    plain = sum(verify(parse(g), parse(c)) == want for c, g, want in LABELLED)
    assert ours == len(LABELLED) and ours >= plain, (ours, plain, len(LABELLED))
