"""What a GRPO step trains on: the pass-rate band and the dynamic-sampling refill, kept and dropped
group by group.

The engine is scripted (each prompt's G answers are fixed: right or wrong), the reward is a
real one in the real killable pool, and the prompt sampler is the run's own, so which
groups reach the loss, how many rounds it took and what was counted are known exactly.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from reason.engine import Sample
from reason.records import Problem
from rewards.registry import RewardTerm
from rewards.score import Scorer
from rl.config import GRPOConfig
from rl.rollout import PromptSet
from rl.sampling import PromptSampler
from rl.trainer import collect

G = 4
# prompt -> how many of its G answers are right: 0 (too hard), 4 (too easy), else informative
RIGHT = {"p0": 0, "p1": 4, "p2": 2, "p3": 0, "p4": 1, "p5": 4, "p6": 3, "p7": 0}


class ScriptedEngine:
    """Answers prompt i with RIGHT[i] correct samples out of G, whatever the sampling settings."""

    def __init__(self, prompts: PromptSet):
        self.by_ids = {tuple(ids): p.id for p, ids in zip(prompts.problems, prompts.ids)}

    def generate(self, prompts, sp):
        out = []
        for ids in prompts:
            right = RIGHT[self.by_ids[tuple(ids)]]
            out.append([Sample("\\boxed{1}" if k < right else "\\boxed{0}", [7], [-1.0], "stop", 1)
                        for k in range(sp.n)])
        return out


@pytest.fixture(scope="module")
def scorer():
    with Scorer([RewardTerm(name="accuracy")], workers=1, timeout=20.0) as s:
        yield s


def run_for(scorer, **algorithm) -> SimpleNamespace:
    problems = [Problem(id=pid, prompt=pid, ground_truth="1") for pid in RIGHT]
    prompts = PromptSet(problems, [[i + 1] for i in range(len(problems))], 0)
    cfg = GRPOConfig.model_validate({"data": {"train": "unused.jsonl"}, "rollout": {"group_size": G},
                                     "train": {"prompts_per_step": 2}, "algorithm": algorithm})
    return SimpleNamespace(cfg=cfg, engine=ScriptedEngine(prompts), train=prompts, scorer=scorer, ref=None,
                           sampler=PromptSampler(len(problems), seed=0),
                           rewarding=ThreadPoolExecutor(1))


def ids(groups) -> list[str]:
    return [g.problem.id for g in groups]


def test_the_band_keeps_the_informative_prompts_and_counts_the_rest(scorer):
    run = run_for(scorer, pass_rate_band=[0.1, 0.9])
    order = run.sampler._order[:2]  # the two prompts this step draws
    kept, every, counts = collect(run, step=0, temperature=1.0)
    drawn = [f"p{i}" for i in order]
    assert ids(every) == drawn
    assert ids(kept) == [p for p in drawn if 0 < RIGHT[p] < G]
    assert counts["groups/too_hard"] == sum(RIGHT[p] == 0 for p in drawn)
    assert counts["groups/too_easy"] == sum(RIGHT[p] == G for p in drawn)


def test_dynamic_sampling_refills_the_batch_with_informative_groups_only(scorer):
    run = run_for(scorer, dynamic_sampling=True, max_resample_rounds=5)
    order = [f"p{i}" for i in run.sampler._order]
    kept, every, counts = collect(run, step=0, temperature=1.0)
    informative = [p for p in order if 0 < RIGHT[p] < G]
    assert ids(kept) == informative[:2]  # the first two informative prompts, in drawing order
    assert ids(every) == order[:len(every)] and len(every) >= order.index(informative[1]) + 1
    assert counts["rounds"] >= 2 and run.sampler.pos == len(every)  # every drawn prompt was consumed once


def test_the_refill_stops_at_its_cap(scorer):
    run = run_for(scorer, dynamic_sampling=True, max_resample_rounds=0)
    kept, every, counts = collect(run, step=0, temperature=1.0)
    assert counts["rounds"] == 1 and len(every) == 2
    assert ids(kept) == [g.problem.id for g in every if 0 < RIGHT[g.problem.id] < G]
