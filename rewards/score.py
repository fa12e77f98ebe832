"""Scoring completions with a recipe's reward terms: one long-lived pool, hard timeouts.

Every stage that needs a reward or a verdict goes through `Scorer`: `reason reward
score`, eval, GRPO rollouts and the distillation filters. It keeps one pool of killable
workers (rewards.sandbox) for its whole life, each warmed up once, and scores each
sample with a hard wall-clock timeout. When a sample's check hangs, its worker is
replaced and the sample is scored again with verification skipped (status "timeout";
it counts as not correct), so the length and format parts of a composite reward are
still given. The chat's think tags reach every reward call, so a recipe with custom
tags is graded as it is sampled.

    >>> with Scorer([RewardTerm(name="accuracy")]) as s:  # doctest: +SKIP
    ...     rows, summary = s.score([ScoreSample(completion="\\\\boxed{4}", ground_truth="4")])
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, NonNegativeInt, field_validator

from rewards.format import answer_text
from rewards.math import skip_verification, verify_answer, warm_up
from rewards.registry import RewardError, RewardTerm, combine, get_reward
from rewards.sandbox import Service, WorkerPool

_WORKER_REWARD: dict[str, Any] = {}


class ScoreSample(BaseModel):
    """One completion plus the problem's fields (extra fields pass through to the rewards)."""

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


def is_correct(components: dict | None) -> bool | None:
    """The verdict in a reward's components: its "acc" (or "<term>/acc") component > 0.5.

    None when the sample was skipped or the reward gives no verdict: a score > 0 is not
    a verdict (with `accuracy + 0.2 * format`, a wrong, well-formed answer scores > 0).

    >>> is_correct({"score": 0.2, "acc": 0.0}), is_correct({"score": 1.0}), is_correct(None)
    (False, None, None)
    """
    if components is None:
        return None
    acc = next((v for k, v in components.items() if k == "acc" or k.endswith("/acc")), None)
    return None if acc is None else acc > 0.5


# ---------------------------------------------------------------- in a worker

def _task(item: tuple) -> Any:
    """Runs in a pool worker: ("score", terms, fields, skip) or ("verify", text, gold, think_close)."""
    if item[0] == "verify":
        _, text, gold, think_close = item
        return verify_answer(answer_text(text, think_close), gold).status
    _, terms, fields, skip = item
    key = json.dumps(terms, sort_keys=True)
    if key not in _WORKER_REWARD:
        _WORKER_REWARD[key] = combine([RewardTerm(**t) for t in terms])
    reward = _WORKER_REWARD[key]
    rest = {k: v for k, v in fields.items() if k != "completion"}
    with skip_verification("timeout") if skip else contextlib.nullcontext():
        return reward(fields["completion"], **rest)


# ---------------------------------------------------------------- the summary

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
        verdict = is_correct(comps)
        if verdict is not None:
            self.acc_sum += verdict
            self.acc_n += 1

    @classmethod
    def of(cls, rows: Sequence[dict], sources: Sequence[str]) -> "Summary":
        """The summary of scored rows ({status, components}), overall and by source."""
        out, by = cls(), defaultdict(Summary)
        for row, source in zip(rows, sources):
            out.add(row["components"], row["status"])
            by[str(source)].add(row["components"], row["status"])
        out.by_source = dict(by)
        return out

    def as_dict(self) -> dict:
        out = {
            "n": self.n, "scored": self.scored, "skipped": self.skipped, "timeouts": self.timeouts,
            "mean_score": self.score_sum / self.scored if self.scored else None,
            "accuracy": self.acc_sum / self.acc_n if self.acc_n else None,
        }
        if self.by_source:
            out["by_source"] = {k: v.as_dict() for k, v in sorted(self.by_source.items())}
        return out


# ---------------------------------------------------------------- the scorer

class Scorer:
    """Weighted reward terms scored in one long-lived pool of killable workers.

    `terms` may be empty for a verify-only scorer (the filters). Safe to share between
    threads (a reward server's requests, a trainer's background scoring): every call's
    items go to whichever worker is free, so one hung check holds one worker only.
    """

    def __init__(self, terms: Sequence[RewardTerm] = (), workers: int | None = None, timeout: float = 10.0,
                 think_open: str = "<think>", think_close: str = "</think>"):
        for t in terms:
            get_reward(t.name)  # an unknown name fails here, not in a worker
        self.terms = [t.model_dump() for t in terms]
        self.timeout, self.think_open, self.think_close = timeout, think_open, think_close
        self.service = Service(WorkerPool(_task, workers=workers or os.cpu_count(), timeout=timeout,
                                          initializer=warm_up))

    def fields(self, sample: ScoreSample | dict) -> dict:
        """What a reward function is called with: the completion, the problem's fields, the think tags."""
        data = sample.model_dump(exclude_none=True) if isinstance(sample, BaseModel) else dict(sample)
        return {"think_open": self.think_open, "think_close": self.think_close, **data}

    def score(self, samples: Sequence[ScoreSample | dict], on_result: Callable[[int], None] | None = None
              ) -> tuple[list[dict], Summary]:
        """One row per sample, in order ({index, id, status, score, components}), and a summary.

        status: "ok", "skipped" (the reward returned None, e.g. an unusable gold) or
        "timeout" (verification hung; the rest of the reward was still given).
        """
        if not self.terms:
            raise ValueError("this Scorer has no reward terms; it can only verify")
        fields = [self.fields(s) for s in samples]
        rows: list[dict | None] = [None] * len(fields)
        pending = {self.service.submit(("score", self.terms, f, False)): (i, "ok") for i, f in enumerate(fields)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i, status = pending.pop(fut)
                out = fut.result()
                if out.status == "timeout" and status == "ok":  # verification hung: the rest of the reward without it
                    pending[self.service.submit(("score", self.terms, fields[i], True))] = (i, "timeout")
                    continue
                if out.status == "error":
                    raise RewardError(f"sample #{i + 1} (id={fields[i].get('id')}): reward failed: {out.error}")
                comps = out.value  # None: skipped, or timed out twice
                rows[i] = {"index": i, "id": fields[i].get("id"),
                           "status": "skipped" if comps is None and status == "ok" else status,
                           "score": None if comps is None else comps["score"], "components": comps}
                if on_result:
                    on_result(1)
        return rows, Summary.of(rows, [f.get("source", "unknown") for f in fields])

    def verify(self, items: Sequence[tuple[str, str | None]]) -> list[str]:
        """One status per (completion, gold): correct, incorrect, no_answer, bad_gold, timeout or error.

        The answer graded is what follows the think block (rewards.format.answer_text).
        """
        statuses: list[str | None] = ["bad_gold" if gold is None or not str(gold).strip() else None
                                      for _, gold in items]
        todo = [i for i, s in enumerate(statuses) if s is None]
        futures = [self.service.submit(("verify", items[i][0], str(items[i][1]), self.think_close)) for i in todo]
        for i, fut in zip(todo, futures):
            out = fut.result()
            statuses[i] = out.value if out.status == "ok" else out.status
        return statuses

    def close(self) -> None:
        self.service.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_samples(samples: Sequence[ScoreSample | dict], terms: Sequence[RewardTerm], workers: int | None = None,
                  timeout: float = 10.0, on_result: Callable[[int], None] | None = None) -> tuple[list[dict], Summary]:
    """Score once with a pool started and stopped here (see Scorer.score)."""
    with Scorer(terms, workers, timeout) as scorer:
        return scorer.score(samples, on_result)
