"""`reason distill judge-pairs`: judge-guided preference pairs (Phi-4's second DPO round).

Phi-4 (arXiv 2412.08905, section 4.3; docs/recipes.md §5): after the Pivotal Token Search round, DPO on pairs an LLM
judge labelled. Here, for each prompt, a response of the model being trained (`--policy`: its
traces, from `reason distill generate` with that model) and a reference response (`--reference`:
a teacher's traces, or a second engine's through `generate`) go to an OpenAI-compatible judge,
asked which is better on the `rubric` (configuration; accuracy, style and detail by default). It
is asked twice with the order swapped, because judges favour a position, and a pair is kept only
when both verdicts name the same response (the swap is this project's guard, not the paper's).

The judge's text is untrusted: only a verdict in one of the forms `parse_verdict` reads counts,
a text with none or with two different ones is an error (never a guess), and the words are kept,
capped, as data. Requests go through the trace generator's client (retries, backoff, Retry-After,
bounded concurrency). Each prompt ends as one line of the log (`--log`, appended, resumed from):
kept, disagree, tie or error, with both verdicts; the pairs file is rewritten whole from the log.
A request that failed for good is that prompt's error; `retry_errors` asks again in a later run.
"""
from __future__ import annotations

import asyncio
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator

from distill.filters import response_text
from distill.pairs import PreferencePair
from distill.teacher import EndpointConfig, TeacherError, drain
from reason.chat import ChatConfig
from reason.console import progress
from reason.errors import UserError
from reason.problems import prompt_text
from reason.records import (JsonlAppender, Problem, Record, RecordError, Rollout, Trace, log_beside, read_jsonl,
                            read_numbered, write_jsonl)
from rewards.format import answer_text

RUBRIC = ("accuracy (is it correct?), style (is it clear and well organised?) and detail (does it give what "
          "the question needs, without padding?)")
TEMPLATE = """Two responses to the same question follow. Which is better? Judge them on {rubric}.

[Question]
{question}

[Response A]
{first}

[Response B]
{second}

Explain your judgement in a few sentences. Then end with one line: "Verdict: A", "Verdict: B" or "Verdict: tie"."""
FIELDS = {"question", "first", "second", "rubric"}


class JudgeConfig(EndpointConfig):
    model: str = ""  # the judge's served model name (Phi-4 used GPT-4o)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1)
    seed: int = 0  # retry jitter
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into each request (see generate)
    rubric: str = RUBRIC
    template: str = TEMPLATE  # the user turn: {question}, {first}, {second}, and optionally {rubric}
    system_prompt: str | None = None
    answer_only: bool = False  # show the judge only what follows the think block
    max_reason_chars: int = Field(4000, ge=0)  # the judge's words kept per verdict
    retry_errors: bool = False  # judge again the prompts whose request failed for good in an earlier run
    chat: ChatConfig = Field(default_factory=ChatConfig)  # the think tags the responses are written with

    @field_validator("template")
    @classmethod
    def _template(cls, text: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as e:
            raise ValueError(f"not a format string: {e}") from None
        if names - FIELDS or not {"question", "first", "second"} <= names:
            raise ValueError(f"needs {{question}}, {{first}} and {{second}} (and may have {{rubric}}), "
                             f"has {sorted(names)}")
        return text


# ---------------------------------------------------------------- the pure parts

_LABEL = r"(A|B|(?i:tie))\b"  # the labels are capitals: "a" in "a tie" is not response A
_FORMS = [re.compile(r"\[\[\s*" + _LABEL + r"\s*\]\]"),
          re.compile(r"(?i:verdict|winner|better response)\s*(?i:is)?\s*[:=-]?\s*[*_`\"'(\[]*\s*(?i:response\s+)?"
                     + _LABEL),
          re.compile(r"\"(?i:verdict|winner)\"\s*:\s*\"(?i:response\s+)?" + _LABEL)]


def parse_verdict(text: str) -> Literal["A", "B", "tie"] | None:
    """The judge's verdict, read leniently but never guessed: None without one, or with two that differ.

    >>> parse_verdict("B is clearer.\\n\\n**Verdict:** A"), parse_verdict('{"winner": "Response B"}')
    ('A', 'B')
    >>> parse_verdict("[[tie]]"), parse_verdict(" B. "), parse_verdict("Verdict: A ... no, Verdict: B")
    ('tie', 'B', None)
    >>> parse_verdict("A is good, B is good."), parse_verdict("verdict: a tie")
    (None, None)
    """
    found = {m.group(1).lower() if m.group(1).lower() == "tie" else m.group(1)
             for form in _FORMS for m in form.finditer(text)}
    if not found:
        bare = text.strip().strip("*_`.\"' ")
        found = {"tie"} if bare.lower() == "tie" else {bare} if bare in ("A", "B") else set()
    return found.pop() if len(found) == 1 else None


Side = Literal["policy", "reference", "tie"]
ORDERS = ("policy_first", "reference_first")


def winner(label: str | None, order: str) -> Side | None:
    """Which response a verdict label names, given the order they were shown in.

    >>> winner("A", "policy_first"), winner("A", "reference_first"), winner("tie", "policy_first")
    ('policy', 'reference', 'tie')
    """
    if label is None or label == "tie":
        return label
    first, second = ("policy", "reference") if order == "policy_first" else ("reference", "policy")
    return first if label == "A" else second


def decide(a: Side | None, b: Side | None) -> Literal["kept", "disagree", "tie", "error"]:
    """Two verdicts (orders swapped) -> the prompt's outcome: a pair only when both name one response.

    >>> decide("policy", "policy"), decide("policy", "reference"), decide("tie", "tie"), decide("tie", None)
    ('kept', 'disagree', 'tie', 'error')
    """
    if a is None or b is None:
        return "error"
    if a != b:
        return "disagree"
    return "tie" if a == "tie" else "kept"


def judge_messages(problem: Problem, first: str, second: str, cfg: JudgeConfig) -> list[dict]:
    """The judge's request: the template filled in (responses as data: braces in them stay as they are)."""
    if cfg.answer_only:
        first, second = (answer_text(r, cfg.chat.think_close) for r in (first, second))
    user = cfg.template.format(question=prompt_text(problem), first=first, second=second, rubric=cfg.rubric)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    return [*system, {"role": "user", "content": user}]


# ---------------------------------------------------------------- records

class Verdict(Record):
    order: Literal["policy_first", "reference_first"]
    winner: Literal["policy", "reference", "tie"] | None = None  # None: no readable verdict
    text: str = ""  # the judge's words, capped at max_reason_chars
    error: str | None = None  # the request failed for good (after retries)


class Judgement(Record):
    """How one prompt ended: one line of the log."""

    problem_id: str
    status: Literal["kept", "disagree", "tie", "error"]
    verdicts: list[Verdict]
    pair: PreferencePair | None = None


class Item(NamedTuple):
    problem: Problem
    policy: str
    reference: str


def _responses(path: Path, key: str, chat: ChatConfig) -> dict[str, tuple[int, Problem, str]]:
    """The first response to each problem in a traces or rollouts file: id -> (line, problem, text)."""
    first = next(read_jsonl(path), None)
    if first is None:
        return {}
    kind = Trace if "reasoning" in first else Rollout if "completion" in first else None
    if kind is None:
        raise RecordError(path, 1, f"{key}: expected traces or rollouts, with a response")
    out: dict[str, tuple[int, Problem, str]] = {}
    for line, rec in read_numbered(path, kind):
        out.setdefault(rec.problem.id, (line, rec.problem, response_text(rec, chat)))
    return out


def read_items(policy: Path, reference: Path, chat: ChatConfig) -> list[Item]:
    """The prompts, in the policy file's order, each with both responses; a missing reference is a
    RecordError at the policy response's line."""
    refs = _responses(reference, "--reference", chat)
    items = []
    for pid, (line, problem, text) in _responses(policy, "--policy", chat).items():
        if pid not in refs:
            raise RecordError(policy, line, f"problem {pid!r} has no reference response in {reference}")
        items.append(Item(problem, text, refs[pid][2]))
    return items


# ---------------------------------------------------------------- asking the judge

async def _ask(client, item: Item, order: str, cfg: JudgeConfig) -> Verdict:
    first, second = (item.policy, item.reference) if order == "policy_first" else (item.reference, item.policy)
    try:
        choices = await client.chat(judge_messages(item.problem, first, second, cfg), n=1,
                                    temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                    extra=cfg.extra_body)
    except TeacherError as e:
        if e.fatal:
            raise
        return Verdict(order=order, error=e.reason)
    if not choices:
        return Verdict(order=order, error="no choices in response")
    text = choices[0].content
    return Verdict(order=order, winner=winner(parse_verdict(text), order), text=text[:cfg.max_reason_chars])


async def _judge(client, item: Item, cfg: JudgeConfig) -> Judgement:
    a, b = await asyncio.gather(*(_ask(client, item, order, cfg) for order in ORDERS))
    status = decide(a.winner, b.winner)
    pair = None
    if status == "kept":
        chosen, rejected = (item.policy, item.reference) if a.winner == "policy" else (item.reference, item.policy)
        pair = PreferencePair(problem=item.problem, chosen=chosen, rejected=rejected, metadata={
            "source": "judge", "judge": cfg.model, "winner": a.winner,
            "verdicts": [v.model_dump(include={"order", "winner", "text"}) for v in (a, b)]})
    return Judgement(problem_id=item.problem.id, status=status, verdicts=[a, b], pair=pair)


@dataclass
class JudgeReport:
    prompts: int
    done_before: int  # prompts already in the log when this run started
    outcomes: dict[str, int] = field(default_factory=dict)  # kept / disagree / tie / error -> prompts
    errors: dict[str, int] = field(default_factory=dict)  # why: a request's failure, or "no verdict"
    policy_won: int = 0  # kept pairs whose chosen response is the policy's


def _summary(items: list[Item], done: dict[str, Judgement], before: int) -> JudgeReport:
    mine = [done[it.problem.id] for it in items if it.problem.id in done]
    errors = Counter(v.error or "no verdict" for j in mine if j.status == "error"
                     for v in j.verdicts if v.winner is None)
    won = sum(j.pair is not None and j.pair.metadata["winner"] == "policy" for j in mine)
    return JudgeReport(prompts=len(items), done_before=before, outcomes=dict(Counter(j.status for j in mine)),
                       errors=dict(errors), policy_won=won)


def read_log(path: str | Path) -> dict[str, Judgement]:
    """Each prompt's judgement in the log; a later line (a retried error) replaces an earlier one."""
    return {j.problem_id: j for j in read_jsonl(path, Judgement)} if Path(path).exists() else {}


def judge_pairs(policy: str | Path, reference: str | Path, out_path: str | Path, cfg: JudgeConfig,
                log_path: str | Path | None = None) -> JudgeReport:
    """Judge every prompt the log lacks; write the kept pairs of the whole log to `out_path`, in prompt order.

    Raises TeacherError when the judge refuses every request (bad key, unknown model).
    """
    if not cfg.model:
        raise UserError("model: the judge's served model name is needed")
    items = read_items(Path(policy), Path(reference), cfg.chat)
    log_path = log_path or log_beside(out_path)
    with JsonlAppender(log_path) as log:  # opening first trims a line torn by a killed run
        done = read_log(log_path)
        if cfg.retry_errors:
            done = {pid: j for pid, j in done.items() if not any(v.error for v in j.verdicts)}
        before = sum(it.problem.id in done for it in items)
        todo = [it for it in items if it.problem.id not in done]
        with progress() as bar:
            task = bar.add_task(f"judging ({cfg.model})", total=len(items), completed=before)

            async def run() -> None:
                async with cfg.client(cfg.model, cfg.seed) as client:
                    async def one(item: Item) -> None:
                        j = await _judge(client, item, cfg)
                        log.write(j)
                        done[j.problem_id] = j
                        bar.advance(task)

                    await drain(todo, cfg.concurrency, one)

            asyncio.run(run())
    write_jsonl(out_path, (done[it.problem.id].pair for it in items if done[it.problem.id].pair is not None))
    return _summary(items, done, before)
