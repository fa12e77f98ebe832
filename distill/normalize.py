"""Turn any teacher's response into the one trace shape: reasoning + answer.

Teachers return reasoning in different places (docs/recipes.md: Phi-4-reasoning distilled
o3-mini, Phi-4-mini-reasoning distilled DeepSeek-R1):
  - "field": R1 style, the reasoning in its own `reasoning_content` field and the
    solution as the content; also o3-mini style where the API returns a reasoning
    summary beside the content.
  - "think": `<think>...</think>` inside the content (an open tag pre-filled by the
    chat template may be missing; the close tag is enough).
  - "plain": no tags and no reasoning field, as o3-mini returns when its reasoning is
    hidden, or a plain chain-of-thought model: everything before the final-answer line
    (the last `\\boxed{}` or "Answer:" line, as `rewards.math.extract_answer` finds it) is
    the reasoning, that line on the answer.
All three become `Trace.reasoning` / `Trace.answer`, which `reason.chat.format_response`
renders as `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`. The think split is
`rewards.format.parse_think`, so traces are held to the same rule as the format reward.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rewards.format import parse_think
from rewards.math import extract_answer


@dataclass(frozen=True)
class Normalized:
    """`problem` says why `ok` is False; reasoning and answer are stripped, empty unless ok."""

    ok: bool
    problem: str | None
    reasoning: str = ""
    answer: str = ""
    style: str = ""  # "field", "think" or "plain"


def _bad(problem: str) -> Normalized:
    return Normalized(ok=False, problem=problem)


def split_plain(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) split at the start of the final-answer line, or None without one.

    The final-answer line is the last line from which `extract_answer` finds an answer
    (a `\\boxed{}`, or an "Answer:" line), so a box or answer that wraps over several
    lines stays whole in the answer.
    """
    if extract_answer(text) is None:  # also keeps answerless text from costing a scan per line
        return None
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    for start in reversed(starts):  # the answer is near the end: this stops after a few lines
        if extract_answer(text[start:]) is not None:
            break  # at the latest at start 0, the whole text
    return text[:start].strip(), text[start:].strip()


def normalize(content: str, reasoning: str | None = None, think_open: str = "<think>",
              think_close: str = "</think>") -> Normalized:
    """Split one response into reasoning and answer; see the module docstring for the styles."""
    content = content or ""
    if reasoning and reasoning.strip():
        for name, text in (("reasoning", reasoning), ("answer", content)):
            if think_open in text or think_close in text:  # would nest a second think block in the trace
                return _bad(f"think tag inside the {name} field")
        if not content.strip():
            return _bad("empty answer after the reasoning field")
        return Normalized(True, None, reasoning.strip(), content.strip(), "field")
    if think_open in content or think_close in content:
        if think_open not in content:  # the chat template pre-filled the open tag
            content = think_open + content
        parsed = parse_think(content, think_open, think_close)
        if not parsed.ok:
            return _bad(parsed.problem)
        return Normalized(True, None, parsed.reasoning, parsed.solution, "think")
    split = split_plain(content)
    if split is None:
        return _bad("no think block, reasoning field or final \\boxed{} answer")
    if not split[0]:
        return _bad("no reasoning before the final answer line")
    return Normalized(True, None, split[0], split[1], "plain")
