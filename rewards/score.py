"""Score a JSONL file of completions with a (combined) reward, in parallel.

Backs `reason reward score`. Each input line is an object with `completion` and
the problem's fields (`ground_truth`, `num_tokens`, `finish_reason`, `source`,
`id`, ...). Every sample is scored in a killable worker with a hard timeout; if
one hangs, its worker is replaced and the sample is re-scored with verification
skipped (status "timeout"; it counts as not correct), so length/format parts of
the reward are still given. Reading and writing files is the CLI's job
(`reason.cli`), so this module stays free of the other packages.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, field_validator

from rewards.math import skip_verification, warm_up
from rewards.registry import RewardTerm, combine
from rewards.sandbox import Outcome, WorkerPool

_WORKER_REWARD: dict[str, Any] = {}


class RewardError(ValueError):
    """A reward function raised: a bug or a sample it cannot handle."""


def _score_task(task: tuple[list[dict], dict, bool]) -> dict | None:
    """Runs in a pool worker: build the combined reward once, then score one sample."""
    terms, sample, verification_timed_out = task
    key = json.dumps(terms, sort_keys=True)
    if key not in _WORKER_REWARD:
        _WORKER_REWARD[key] = combine([RewardTerm(**t) for t in terms])
    reward = _WORKER_REWARD[key]
    fields = {k: v for k, v in sample.items() if k != "completion"}
    if verification_timed_out:
        with skip_verification("timeout"):
            return reward(sample["completion"], **fields)
    return reward(sample["completion"], **fields)


class ScoreSample(BaseModel):
    """One input line: the completion plus the problem's fields (extra fields pass through)."""

    model_config = ConfigDict(extra="allow")
    completion: str
    ground_truth: str | None = None
    num_tokens: NonNegativeInt | None = None
    finish_reason: Literal["stop", "length"] | None = None
    source: str = "unknown"

    @field_validator("ground_truth", mode="before")
    @classmethod
    def _number_as_text(cls, v):
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


@dataclass
class Summary:
    n: int = 0
    scored: int = 0
    skipped: int = 0
    timeouts: int = 0
    score_sum: float = 0.0
    acc_sum: float = 0.0
    acc_n: int = 0
    by_source: dict[str, "Summary"] = field(default_factory=dict)

    def add(self, comps: dict | None, status: str) -> None:
        self.n += 1
        self.timeouts += status == "timeout"
        if comps is None:
            self.skipped += 1
            return
        self.scored += 1
        self.score_sum += comps["score"]
        acc = next((v for k, v in comps.items() if k == "acc" or k.endswith("/acc")), None)
        if acc is not None:
            self.acc_sum += acc
            self.acc_n += 1

    def as_dict(self) -> dict:
        out = {
            "n": self.n, "scored": self.scored, "skipped": self.skipped, "timeouts": self.timeouts,
            "mean_score": self.score_sum / self.scored if self.scored else None,
            "accuracy": self.acc_sum / self.acc_n if self.acc_n else None,
        }
        if self.by_source:
            out["by_source"] = {k: v.as_dict() for k, v in sorted(self.by_source.items())}
        return out


def score_samples(samples: list[ScoreSample], terms: list[RewardTerm], workers: int | None = None,
                  timeout: float = 10.0, on_result: Callable[[int], None] | None = None
                  ) -> tuple[list[dict], Summary]:
    """Score samples; return one output row per sample (input order) and a summary."""
    term_dicts = [t.model_dump() for t in terms]
    clean = [s.model_dump(exclude_none=True) for s in samples]
    rows: list[dict | None] = [None] * len(samples)
    summary = Summary(by_source=defaultdict(Summary))
    retry: list[int] = []

    def finish(i: int, out: Outcome, status: str) -> None:
        if out.status == "error":
            raise RewardError(f"sample #{i + 1} (id={clean[i].get('id')}): reward failed: {out.error}")
        comps = out.value
        rows[i] = {"index": i, "id": clean[i].get("id"), "status":
                   "skipped" if comps is None and status == "ok" else status,
                   "score": None if comps is None else comps["score"], "components": comps}
        summary.add(comps, status)
        summary.by_source[str(clean[i].get("source", "unknown"))].add(comps, status)
        if on_result:
            on_result(1)

    def first(i: int, out: Outcome) -> None:
        if out.status == "timeout":
            retry.append(i)
        else:
            finish(i, out, "ok")

    with WorkerPool(_score_task, workers=workers or os.cpu_count(), timeout=timeout,
                    initializer=warm_up) as pool:
        pool.map([(term_dicts, s, False) for s in clean], on_result=first)
        if retry:  # verification hung: score the rest of the reward without it
            outs = pool.map([(term_dicts, clean[i], True) for i in retry])
            for i, out in zip(retry, outs):
                finish(i, out, "timeout")
    summary.by_source = dict(summary.by_source)
    return rows, summary
