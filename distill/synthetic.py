"""A programmatic teacher for the built-in synthetic problems (reason.synthetic).

The demo has no teacher model to distil from, so `synthetic_trace` plays one: it writes
the worked steps of a generated problem as `<think>` reasoning and a boxed answer, the
way o3-mini / R1 traces are distilled for Phi-4-reasoning (arXiv 2504.21318, section 3)
and Phi-4-mini-reasoning (arXiv 2504.21233, section 3). `mistake_rate` makes some traces
end on a wrong answer: the incorrect teacher rollouts that rejection sampling drops and
that rollout DPO uses as "rejected" (Phi-4-mini stage 3).
"""
from __future__ import annotations

import random
from fractions import Fraction

from reason.records import Problem, Trace
from reason.synthetic import format_answer, solution


def _wrong(value: Fraction, rng: random.Random) -> Fraction:
    """A plausible slip: off by a small amount, or a numerator off by one."""
    if value.denominator == 1:
        return value + rng.choice([-10, -2, -1, 1, 2, 10])
    return Fraction(value.numerator + rng.choice([-1, 1]), value.denominator)


def _opening(kind: str, p: dict, prompt: str) -> str:
    """A restatement before any work, the "Okay, so I need to..." of distilled traces."""
    if kind in ("add", "add2", "sub", "sub2"):
        op = "+" if kind.startswith("add") else "-"
        return (f"Okay, so I need to find {p['a']} {op} {p['b']}. Let me think about how to do this. "
                "I can line up the digits by place value and go column by column, starting from the ones place.")
    return (f"Okay, so the question is: {prompt} Let me think about how to do this carefully, "
            "one step at a time, and write down every step before I give the answer.")


def synthetic_trace(problem: Problem, sample: int = 0, seed: int = 0, mistake_rate: float = 0.0,
                    opening_rate: float = 0.0) -> Trace:
    """A correct step-by-step trace for a generated problem, or, with probability
    `mistake_rate`, one whose final step and boxed answer are wrong. With probability
    `opening_rate` it first restates the question ("Okay, so I need to find 43 - 15. Let
    me think...") as distilled R1 / o3-mini traces often do: words that compute
    nothing, for the length-aware GRPO reward to trim (Phi-4-reasoning-plus).
    The canonical text is `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`.
    """
    steps, value = solution(problem)
    kind, params = problem.metadata["kind"], problem.metadata["params"]
    rng = random.Random(f"{seed}:{problem.id}:{sample}")  # str seeds hash the same in every process
    shown = value
    if rng.random() < mistake_rate:
        shown = _wrong(value, rng)
        last = steps[-1]
        cut = last.rfind(format_answer(value))
        steps[-1] = last[:cut] + format_answer(shown) + last[cut + len(format_answer(value)):]
    if opening_rate and rng.random() < opening_rate:  # drawn after the mistake: the same traces stay wrong
        steps.insert(0, _opening(kind, params, problem.prompt))
    return Trace(problem=problem, sample=sample, reasoning="\n".join(steps),
                 answer=f"The answer is \\boxed{{{format_answer(shown)}}}.", teacher="synthetic",
                 sampling={"seed": seed, "mistake_rate": mistake_rate, "opening_rate": opening_rate})
