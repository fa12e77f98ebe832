"""Preference pairs for rollout preference learning (Phi-4-mini-reasoning stage 3).

arXiv 2504.21233 (docs/recipes.md §3): DPO on teacher rollouts, a verified-correct rollout as
"chosen" and an incorrect one of the same problem as "rejected" (~300K pairs in
the paper). Correctness comes from the same math-verify check as rejection
sampling (`distill.filters.verify_records`). A response with no final answer
counts as incorrect; one whose check could not run (bad gold, timeout, error)
is left out of every pair.

Record shape, one JSON line per pair (`PreferencePair`):
  {"problem": Problem, "chosen": str, "rejected": str, "metadata": {...}}
`chosen` / `rejected` are whole assistant responses (`<think>...</think>` then the
solution), to be rendered after the problem's prompt by the chat format; metadata
names the samples used and why the rejected one is wrong. `reason distill judge-pairs`
writes the same record, its metadata holding the judge's verdicts.

`TokenPair` is the other shape DPO trains on: Pivotal Token Search's (distill.pts) single
chosen and rejected tokens after a shared prompt and solution prefix, all as token ids.
"""
from __future__ import annotations

import random
from collections import Counter
from contextlib import nullcontext
from typing import Any, NamedTuple, Sequence

from pydantic import Field

from distill.filters import (Dropped, FilterReport, FilterResult, VerifyOptions, response_text, verify_records,
                             verify_scorer)
from reason.chat import ChatConfig
from reason.config import Section
from reason.records import Problem, Record, Rollout, Trace
from rewards.score import Scorer

REJECTED = ("incorrect", "no_answer")  # verification statuses that make a response "rejected"


class PreferencePair(Record):
    problem: Problem
    chosen: str
    rejected: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class TokenPair(Record):
    """After `prompt_ids` + `prefix_ids`, the single token `chosen_id` over `rejected_id`.

    Ids are the sampling model's own (never re-tokenised); the texts are for reading, and DPO
    checks them against its tokenizer. p_before / p_after: p(success) before and after the
    solution's own token at this position (metadata.pivot says which side it is).
    """

    problem_id: str
    prompt_ids: list[int]
    prefix_ids: list[int]
    prefix: str
    chosen_id: int
    chosen: str
    rejected_id: int
    rejected: str
    p_before: float
    p_after: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class PairOptions(Section):
    max_pairs_per_problem: int = Field(4, ge=1)
    seed: int = 0
    chat: ChatConfig = Field(default_factory=ChatConfig)  # the think tags responses are written with
    verify: VerifyOptions = Field(default_factory=VerifyOptions)


def _sample_of(rec: Trace | Rollout, fallback: int) -> int:
    return rec.sample if isinstance(rec, Trace) else fallback


class _Group(NamedTuple):
    problem: Problem
    good: list[tuple[int, Trace | Rollout]]  # (position in the input, record)
    bad: list[tuple[int, Trace | Rollout, str]]  # ... and its status


def _group(labelled: Sequence[tuple[Trace | Rollout, str]]) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    for k, (rec, status) in enumerate(labelled):
        g = groups.setdefault(rec.problem.id, _Group(rec.problem, [], []))
        if status == "correct":
            g.good.append((k, rec))
        elif status in REJECTED:
            g.bad.append((k, rec, status))
    return groups


def _pairs_of(g: _Group, max_pairs: int, seed: int, chat: ChatConfig) -> list[PreferencePair]:
    rng = random.Random(f"{seed}:{g.problem.id}")  # per problem: its pairs do not depend on the others
    cells = rng.sample(range(len(g.good) * len(g.bad)), min(max_pairs, len(g.good) * len(g.bad)))
    out = []
    for cell in cells:  # a cell of the good x bad grid; sampling cells keeps the pairs distinct
        (kc, chosen), (kr, rejected, why) = g.good[cell // len(g.bad)], g.bad[cell % len(g.bad)]
        out.append(PreferencePair(
            problem=g.problem,
            chosen=response_text(chosen, chat),
            rejected=response_text(rejected, chat),
            metadata={"chosen_sample": _sample_of(chosen, kc), "rejected_sample": _sample_of(rejected, kr),
                      "rejected_status": why}))
    return out


def preference_pairs(records: Sequence[Trace | Rollout], opts: PairOptions | None = None,
                     scorer: Scorer | None = None) -> FilterResult:
    """Verify every response, then pair them: (pairs, dropped, report).

    Each problem gives up to `max_pairs_per_problem` distinct (chosen = correct, rejected)
    pairs, drawn at random; a Rollout's sample number in the metadata is its position in
    `records`. Dropped: responses whose check could not run (reason = their status), and
    problems that have no correct or no incorrect response (reason `no_correct` /
    `no_incorrect`, the record being the Problem). `scorer`: a running verify_scorer to
    reuse; without one, one is started and stopped here.
    """
    opts = opts or PairOptions()
    with nullcontext(scorer) if scorer is not None else verify_scorer(opts.verify, opts.chat) as running:
        statuses = verify_records(records, running)
    groups = _group(list(zip(records, statuses)))
    pairs = [pair for g in groups.values()
             for pair in _pairs_of(g, opts.max_pairs_per_problem, opts.seed, opts.chat)]
    dropped = [Dropped(reason=s, detail=f"gold {r.problem.ground_truth!r}", record=r)
               for r, s in zip(records, statuses) if s != "correct" and s not in REJECTED]
    for pid, g in groups.items():
        if not g.good:
            dropped.append(Dropped(reason="no_correct", detail=f"problem {pid}", record=g.problem))
        if not g.bad:
            dropped.append(Dropped(reason="no_incorrect", detail=f"problem {pid}", record=g.problem))
    report = FilterReport(name="pairs", seen=len(records), kept=len(pairs),
                          dropped=dict(Counter(d.reason for d in dropped)),
                          details={"statuses": dict(Counter(statuses)), "problems": len(groups),
                                   "problems_paired": len({p.problem.id for p in pairs})})
    return FilterResult(pairs, dropped, report)
