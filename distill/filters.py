"""Filters for distillation data: each keeps some records and says why it dropped the rest.

Paper knobs (arXiv 2504.21318 and 2504.21233; docs/recipes.md §1, §3):
- `filter_verified`: rejection sampling, the Phi-4-mini-reasoning rule: keep only
  traces whose final `\\boxed{}` answer math-verify judges equal to the ground truth.
  Verification runs in killable worker processes with a hard timeout (docs/recipes.md
  section 4); an unusable gold answer is counted as `bad_gold`, never kept.
- `filter_format`: the `<think> {reasoning} </think> {solution}` shape, and
  completion (a response cut off at the length limit is dropped).
- `filter_length`: token bounds, counted with a tokenizer, never in characters.
- `filter_duplicates` and `filter_contaminated` live in `distill/dedup.py`.

Every filter is `f(records, options) -> FilterResult(kept, dropped, report)`, where
records are Problems, Traces or Rollouts, `dropped` holds each dropped record with
a reason code and a detail, and `report` counts what was dropped and why.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict, Field

from reason.chat import ChatConfig, format_response
from reason.config import Section
from reason.problems import prompt_text
from reason.records import Problem, Rollout, Trace
from rewards.format import parse_think
from rewards.score import Scorer

AnyRecord = Problem | Trace | Rollout


class Dropped(BaseModel):
    """A dropped record: `reason` is a short code to count by, `detail` says more."""

    model_config = ConfigDict(extra="forbid")
    reason: str
    detail: str = ""
    record: AnyRecord


class FilterReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    seen: int
    kept: int
    dropped: dict[str, int] = Field(default_factory=dict)  # reason -> count
    details: dict[str, Any] = Field(default_factory=dict)


class FilterResult(NamedTuple):
    kept: list
    dropped: list[Dropped]
    report: FilterReport


def partition(name: str, records: Sequence, verdicts: Sequence[tuple[str, str] | None],
               details: dict | None = None) -> FilterResult:
    """Split records by their verdict: None keeps, (reason, detail) drops."""
    kept, dropped = [], []
    for rec, v in zip(records, verdicts, strict=True):
        if v is None:
            kept.append(rec)
        else:
            dropped.append(Dropped(reason=v[0], detail=v[1], record=rec))
    counts = dict(Counter(d.reason for d in dropped))
    report = FilterReport(name=name, seen=len(records), kept=len(kept), dropped=counts, details=details or {})
    return FilterResult(kept, dropped, report)


def problem_of(rec: AnyRecord) -> Problem:
    return rec if isinstance(rec, Problem) else rec.problem


def response_text(rec: Trace | Rollout, chat: ChatConfig) -> str:
    """The assistant's whole response: the canonical trace text, or the rollout's completion."""
    return rec.completion if isinstance(rec, Rollout) else format_response(rec.reasoning, rec.answer, chat)


def record_name(rec: AnyRecord) -> str:
    return f"{rec.problem.id}#{rec.sample}" if isinstance(rec, Trace) else problem_of(rec).id


# ---------------------------------------------------------------- verified-correct

class VerifyOptions(Section):
    timeout: float = Field(5.0, gt=0)  # seconds per answer; a hung math-verify call is killed
    workers: int = Field(2, ge=1)


def verify_scorer(opts: VerifyOptions, chat: ChatConfig) -> Scorer:
    """A verify-only Scorer with the chat's think tags; reuse one across calls (start-up is seconds)."""
    return Scorer((), opts.workers, opts.timeout, chat.think_open, chat.think_close)


def verify_records(records: Sequence[Trace | Rollout], scorer: Scorer) -> list[str]:
    """One status per record: correct, incorrect, no_answer, bad_gold, timeout or error.

    What is graded follows the think block: a trace's answer, a rollout's text after it.
    """
    chat = ChatConfig(think_open=scorer.think_open, think_close=scorer.think_close)
    return scorer.verify([(response_text(r, chat), r.problem.ground_truth) for r in records])


def filter_verified(records: Sequence[Trace | Rollout], scorer: Scorer) -> FilterResult:
    """Keep records whose final answer is verified equal to the problem's ground truth."""
    statuses = verify_records(records, scorer)
    verdicts = [None if s == "correct" else (s, f"gold {r.problem.ground_truth!r}")
                for s, r in zip(statuses, records)]
    return partition("verified", records, verdicts)


# ---------------------------------------------------------------- format and completion

def filter_format(records: Sequence[Trace | Rollout], chat: ChatConfig) -> FilterResult:
    """Drop responses cut off at the length limit, and ones without one clean think block."""
    verdicts = []
    for rec in records:
        # Trace generation stores the teacher's finish_reason with the sampling settings.
        finish = rec.finish_reason if isinstance(rec, Rollout) else rec.sampling.get("finish_reason")
        if finish == "length":
            verdicts.append(("truncated", "finish_reason=length"))
            continue
        parsed = parse_think(response_text(rec, chat), chat.think_open, chat.think_close)
        verdicts.append(None if parsed.ok else ("bad_format", parsed.problem))
    return partition("format", records, verdicts)


# ---------------------------------------------------------------- token length

class LengthOptions(Section):
    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(32_768, ge=1)
    include_prompt: bool = False  # count the prompt's tokens too (sequence-length budgets)


def filter_length(records: Sequence[AnyRecord], opts: LengthOptions, count_tokens: Callable[[str], int],
                  chat: ChatConfig) -> FilterResult:
    """Keep records whose response (a Problem: its prompt) has min..max tokens.

    `count_tokens` maps text to a token count, e.g. `lambda s: len(tok.encode(s))`;
    a Rollout's own token ids are counted when it has them.
    """
    verdicts, lengths = [], []
    for rec in records:
        if isinstance(rec, Problem):
            n = count_tokens(prompt_text(rec))
        else:
            own = isinstance(rec, Rollout) and rec.token_ids
            n = len(rec.token_ids) if own else count_tokens(response_text(rec, chat))
            if opts.include_prompt:
                n += count_tokens(prompt_text(rec.problem))
        lengths.append(n)
        if n < opts.min_tokens:
            verdicts.append(("too_short", f"{n} tokens < {opts.min_tokens}"))
        elif n > opts.max_tokens:
            verdicts.append(("too_long", f"{n} tokens > {opts.max_tokens}"))
        else:
            verdicts.append(None)
    details = {"min_tokens": min(lengths), "max_tokens": max(lengths),
               "mean_tokens": sum(lengths) / len(lengths)} if lengths else {}
    return partition("length", records, verdicts, details)
