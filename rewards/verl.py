"""Any `reason` reward in verl's `compute_score` form.

verl 0.9 calls `compute_score(data_source=, solution_str=, ground_truth=,
extra_info=, **reward_kwargs)` once per sample and wants a float or a dict with
"score" whose keys are the same for every sample. Point a verl job at it with
    reward.custom_reward_function.path=<this file>  reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.reward=phi4_plus
and, for custom think tags, `...reward_kwargs.think_open` / `think_close` (the old
top-level `custom_reward_function.*` keys validate in verl 0.9.1 but are silently
ignored). Token count and finish reason come from kwargs or extra_info
(`num_tokens`, `finish_reason`), which this project's verl reward manager fills.
A skipped sample (unusable ground truth) scores 0.0 with `skipped` = 1.0: verl
has no notion of skipping, so the skip is made visible instead of rewarded.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from rewards.math import skip_verification
from rewards.registry import RewardTerm, combine

_PROBE = "<think>\nprobe\n</think>\n\n\\boxed{1}"


@lru_cache(maxsize=None)
def _reward(terms_key: tuple) -> tuple:
    terms = [RewardTerm(name=n, weight=w, args=dict(a)) for n, w, a in terms_key]
    fn = combine(terms)
    # verl needs the same keys every sample: learn them once from a probe sample.
    with skip_verification("incorrect"):
        keys = sorted(fn(_PROBE, ground_truth="1", num_tokens=8, finish_reason="stop") or {"score": 0.0})
    return fn, keys


def _terms_key(reward: str | None, terms: list[dict] | None) -> tuple:
    if terms:
        return tuple((t["name"], float(t.get("weight", 1.0)), tuple(sorted(t.get("args", {}).items())))
                     for t in terms)
    return ((reward or "phi4_plus", 1.0, ()),)


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  reward: str | None = None, terms: list[dict] | None = None, think_open: str = "<think>",
                  think_close: str = "</think>", timeout: float = 10.0, **kwargs) -> dict[str, float]:
    """Score one verl sample with a named reward (or weighted `terms`), the recipe's think tags, and
    `timeout` seconds for its answer check (a killable worker; reward.timeout in the recipe)."""
    extra = dict(extra_info or {})
    fn, keys = _reward(_terms_key(reward, terms))
    fields = {
        "ground_truth": None if ground_truth is None else str(ground_truth),
        "num_tokens": kwargs.get("num_tokens", extra.get("num_tokens")),
        "finish_reason": kwargs.get("finish_reason", extra.get("finish_reason")),
        "source": data_source,
        "think_open": think_open,
        "think_close": think_close,
        "timeout": timeout,
    }
    comps = fn(solution_str, **fields)
    if comps is None:
        return {**{k: 0.0 for k in keys}, "skipped": 1.0}
    return {**{k: comps.get(k, 0.0) for k in keys}, "skipped": 0.0}
