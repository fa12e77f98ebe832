"""Completions scored per second: `reason`'s parallel scorer vs plain sequential math-verify.

Both score the same seeded mix of completions (numbers, fractions, expressions,
sets, intervals, tuples, equations, text, "Answer:" lines, no answer, long
reasoning, and a few adversarial items) in the same run. The baseline is what
most RL code does: `verify(parse(gold), parse(completion))` in a loop on the main
thread with math-verify's own (SIGALRM) timeouts, on the same answer text. Ours is `accuracy` through
`rewards.score.score_samples` (killable workers, hard timeouts).

    python benchmarks/bench_rewards.py --n 10000 --workers 2 [--adversarial 0.001]

Hostile items cost the baseline its full SIGALRM timeout, so run once with
`--adversarial 0` too: that ratio is pure throughput. Plain math-verify also grades
fewer items correct (it cannot parse a bare gold such as `[2, 5)` or `yes`), so with
`--adversarial 0` a third line runs reason's own `verify_answer` in the same
sequential loop: the same grading, and the speed-up that parallelism alone buys.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import time

from math_verify import parse, verify

from rewards.math import verify_answer
from rewards.registry import RewardTerm
from rewards.score import ScoreSample, score_samples

THINK = "<think>\n{r}\n</think>\n\n"


def _item(rng: random.Random, adversarial: float) -> tuple[str, str]:
    """One (completion, gold) pair of a random kind."""
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    wrong = rng.random() < 0.4
    kind = rng.choice(["int", "frac", "expr", "set", "interval", "tuple", "eq", "text",
                       "answer_line", "none", "long"])
    reasoning = f"We compute {a} and {b} step by step."
    if kind == "int":
        gold, ans = str(a + b), f"\\boxed{{{a + b + wrong}}}"
    elif kind == "frac":
        gold, ans = f"{a}/{a + b}", f"\\boxed{{\\frac{{{a + wrong}}}{{{a + b}}}}}"
    elif kind == "expr":
        gold, ans = f"{b}x + {b * a}", f"\\boxed{{{b}(x + {a + wrong})}}"
    elif kind == "set":
        gold, ans = f"\\{{{a}, {b}\\}}", f"\\boxed{{\\{{{b}, {a + wrong}\\}}}}"
    elif kind == "interval":
        gold, ans = f"[{b}, {a + b})", f"\\boxed{{[{b}, {a + b + wrong})}}"
    elif kind == "tuple":
        gold, ans = f"({a}, {b})", f"\\boxed{{({a}, {b + wrong})}}"
    elif kind == "eq":
        gold, ans = str(a), f"\\boxed{{x = {a + wrong}}}"
    elif kind == "text":
        gold, ans = "yes", "\\boxed{\\text{" + ("no" if wrong else "yes") + "}}"
    elif kind == "answer_line":
        gold, ans = str(a * b), f"Answer: {a * b + wrong}"
    elif kind == "none":
        gold, ans = str(a), "I am not sure."
    else:
        gold, ans = str(a - b), f"\\boxed{{{a - b + wrong}}}"
        reasoning = " ".join(f"step {i}: {a} - {i} = {a - i}." for i in range(400))
    if rng.random() < adversarial:  # adversarial: a verification that would run for ages
        ans = "\\boxed{" + rng.choice(["9^{9^{9^{9^{9}}}}", "(10^{100})!", "(" * 3000 + "1" + ")" * 3000]) + "}"
    return THINK.format(r=reasoning) + ans, gold


def sequential(items: list[tuple[str, str]]) -> tuple[float, int]:
    start, correct = time.perf_counter(), 0
    for completion, gold in items:
        answer = completion.rpartition("</think>")[2]  # the same text ours grades
        try:
            correct += bool(verify(parse(gold), parse(answer)))
        except Exception:
            pass
    return time.perf_counter() - start, correct


def sequential_same_grading(items: list[tuple[str, str]]) -> tuple[float, int]:
    start = time.perf_counter()
    correct = sum(verify_answer(c, g).correct for c, g in items)  # no timeout: hostile-free items only
    return time.perf_counter() - start, correct


def ours(items: list[tuple[str, str]], workers: int, timeout: float) -> tuple[float, int, dict]:
    samples = [ScoreSample(completion=c, ground_truth=g) for c, g in items]
    start = time.perf_counter()
    rows, summary = score_samples(samples, [RewardTerm(name="accuracy")], workers=workers, timeout=timeout)
    elapsed = time.perf_counter() - start
    return elapsed, sum(1 for r in rows if r["score"] == 1.0), summary.as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adversarial", type=float, default=0.001, help="fraction of hostile items")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every unparseable input in full
    rng = random.Random(args.seed)
    items = [_item(rng, args.adversarial) for _ in range(args.n)]

    t_ours, c_ours, summary = ours(items, args.workers, args.timeout)
    t_seq, c_seq = sequential(items)
    print(f"completions: {args.n}  cores: {os.cpu_count()}  workers: {args.workers}")
    print(f"sequential math-verify : {args.n / t_seq:8.1f} completions/s  ({t_seq:.1f} s, {c_seq} correct)")
    print(f"reason score_samples   : {args.n / t_ours:8.1f} completions/s  ({t_ours:.1f} s, {c_ours} correct, "
          f"{summary['timeouts']} timeouts, {summary['skipped']} skipped)")
    print(f"speed-up vs plain math-verify: {t_seq / t_ours:.2f}x")
    if args.adversarial == 0:
        t_same, c_same = sequential_same_grading(items)
        print(f"reason verify_answer, sequential: {args.n / t_same:8.1f} completions/s  "
              f"({t_same:.1f} s, {c_same} correct)")
        print(f"speed-up vs the same grading, sequential: {t_same / t_ours:.2f}x")


if __name__ == "__main__":
    main()
