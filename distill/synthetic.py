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


def _glance(kind: str, p: dict, shown: Fraction) -> str:
    """The whole reasoning of a teacher that answers after a glance: the result, no working."""
    if kind in ("add", "add2", "sub", "sub2"):
        op = "+" if kind.startswith("add") else "-"
        return f"At a glance, {p['a']} {op} {p['b']} = {format_answer(shown)}."
    return f"At a glance, the answer is {format_answer(shown)}."


def synthetic_trace(problem: Problem, sample: int = 0, seed: int = 0, mistake_rate: float = 0.0,
                    glance_rate: float = 0.0) -> Trace:
    """A correct step-by-step trace for a generated problem, or, with probability
    `mistake_rate`, one whose final step and boxed answer are wrong. With probability
    `glance_rate` the teacher answers after a glance instead ("At a glance, 43 + 15 = 58."):
    as right as its worked traces, with no working for a student to imitate, as real
    teachers sometimes skip the reasoning. A student that copies the glance must do the
    sum in its head, and a small one often cannot.
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
    if glance_rate and rng.random() < glance_rate:  # drawn after the mistake: the same traces stay wrong
        steps = [_glance(kind, params, shown)]
    return Trace(problem=problem, sample=sample, reasoning="\n".join(steps),
                 answer=f"The answer is \\boxed{{{format_answer(shown)}}}.", teacher="synthetic",
                 sampling={"seed": seed, "mistake_rate": mistake_rate, "glance_rate": glance_rate})
