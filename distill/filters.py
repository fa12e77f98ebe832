"""Filters for distillation data: each keeps some records and says why it dropped the rest.

Paper knobs (RECIPES.md sections 1 and 3):
- `filter_verified`: rejection sampling, the Phi-4-mini-reasoning rule: keep only
  traces whose final `\\boxed{}` answer math-verify judges equal to the ground truth.
  Verification runs in killable worker processes with a hard timeout (RECIPES.md
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

from distill.problems import prompt_text
from reason.chat import ChatConfig, format_response
from reason.config import Section
from reason.records import Problem, Rollout, Trace
from rewards.format import parse_think
from rewards.math import verify_pair, warm_up
from rewards.sandbox import WorkerPool

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

    def summary(self) -> str:
        why = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) or "none"
        return f"{self.name}: kept {self.kept}/{self.seen}; dropped: {why}"


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


def response_text(rec: Trace | Rollout, think_open: str = "<think>", think_close: str = "</think>") -> str:
    """The assistant's whole response: the canonical trace text, or the rollout's completion."""
    if isinstance(rec, Rollout):
        return rec.completion
    return format_response(rec.reasoning, rec.answer, ChatConfig(think_open=think_open, think_close=think_close))


def record_name(rec: AnyRecord) -> str:
    return f"{rec.problem.id}#{rec.sample}" if isinstance(rec, Trace) else problem_of(rec).id


# ---------------------------------------------------------------- verified-correct

class VerifyOptions(Section):
    timeout: float = Field(5.0, gt=0)  # seconds per answer; a hung math-verify call is killed
    workers: int = Field(2, ge=1)
    think_close: str = "</think>"


def answer_section(rec: Trace | Rollout, think_close: str = "</think>") -> str:
    """What is graded: the text after the reasoning, so a \\boxed{} mid-thought doesn't count."""
    if isinstance(rec, Trace):
        return rec.answer
    head, sep, tail = rec.completion.rpartition(think_close)
    return tail if sep else rec.completion


def verify_pool(opts: VerifyOptions) -> WorkerPool:
    """Worker processes running `rewards.math.verify_pair`; reuse one across calls (start-up is seconds)."""
    return WorkerPool(verify_pair, workers=opts.workers, timeout=opts.timeout, initializer=warm_up)


def verify_records(records: Sequence[Trace | Rollout], opts: VerifyOptions, pool: WorkerPool | None = None
                   ) -> list[str]:
    """One status per record: correct, incorrect, no_answer, bad_gold, timeout or error.

    `pool` is a `verify_pool`; without one, a pool is started and closed here.
    """
    statuses: list[str | None] = [None] * len(records)
    todo = []
    for i, rec in enumerate(records):
        gold = rec.problem.ground_truth
        if gold is None or not gold.strip():
            statuses[i] = "bad_gold"
        else:
            todo.append(i)
    if not todo:
        return statuses
    items = [(answer_section(records[i], opts.think_close), records[i].problem.ground_truth) for i in todo]
    if pool is None:
        with verify_pool(opts) as own:
            outs = own.map(items)
    else:
        outs = pool.map(items, timeout=opts.timeout)
    for i, out in zip(todo, outs):
        statuses[i] = out.value.status if out.status == "ok" else out.status
    return statuses


def filter_verified(records: Sequence[Trace | Rollout], opts: VerifyOptions | None = None,
                    pool: WorkerPool | None = None) -> FilterResult:
    """Keep records whose final answer is verified equal to the problem's ground truth."""
    opts = opts or VerifyOptions()
    statuses = verify_records(records, opts, pool)
    verdicts = [None if s == "correct" else (s, f"gold {r.problem.ground_truth!r}")
                for s, r in zip(statuses, records)]
    return partition("verified", records, verdicts)


# ---------------------------------------------------------------- format and completion

class FormatOptions(Section):
    think_open: str = "<think>"
    think_close: str = "</think>"


def _finish_reason(rec: Trace | Rollout) -> str | None:
    # Trace generation stores the teacher's finish_reason with the sampling settings.
    return rec.finish_reason if isinstance(rec, Rollout) else rec.sampling.get("finish_reason")


def filter_format(records: Sequence[Trace | Rollout], opts: FormatOptions | None = None) -> FilterResult:
    """Drop responses cut off at the length limit, and ones without one clean think block."""
    opts = opts or FormatOptions()
    verdicts = []
    for rec in records:
        if _finish_reason(rec) == "length":
            verdicts.append(("truncated", "finish_reason=length"))
            continue
        parsed = parse_think(response_text(rec, opts.think_open, opts.think_close), opts.think_open,
                             opts.think_close)
        verdicts.append(None if parsed.ok else ("bad_format", parsed.problem))
    return partition("format", records, verdicts)


# ---------------------------------------------------------------- token length

class LengthOptions(Section):
    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(32_768, ge=1)
    include_prompt: bool = False  # count the prompt's tokens too (sequence-length budgets)


def filter_length(records: Sequence[AnyRecord], opts: LengthOptions, count_tokens: Callable[[str], int]
                  ) -> FilterResult:
    """Keep records whose response (a Problem: its prompt) has min..max tokens.

    `count_tokens` maps text to a token count, e.g. `lambda s: len(tok.encode(s))`;
    a Rollout's own token ids are counted when it has them.
    """
    verdicts, lengths = [], []
    for rec in records:
        if isinstance(rec, Problem):
            n = count_tokens(prompt_text(rec))
        else:
            n = len(rec.token_ids) if isinstance(rec, Rollout) and rec.token_ids else count_tokens(response_text(rec))
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
