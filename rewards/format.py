"""The Phi-4 response shape `<think> {reasoning} </think> {solution}`, and truncation.

Implements the format overrides of the Phi-4-reasoning-plus reward (arXiv 2504.21318;
docs/recipes.md §2): a missing or malformed think block scores -1.0, a response that never
reached end-of-sequence scores -0.5 (the numbers live in `rewards.length`).
`parse_think` is the project's one splitter of reasoning vs answer: the chat format
and the trace normaliser use it too, so training, sampling and rewards agree on
what a well-formed response is.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkParse:
    """What `parse_think` found.

    `problem` says why `ok` is False (None when ok). `reasoning` and `solution` are
    whitespace-stripped, and both empty unless ok: a malformed response has no
    trustworthy split, and callers that want the raw text already have it.
    """

    ok: bool
    problem: str | None
    reasoning: str = ""
    solution: str = ""


def _bad(problem: str) -> ThinkParse:
    return ThinkParse(ok=False, problem=problem)


def parse_think(completion: str, think_open: str = "<think>", think_close: str = "</think>") -> ThinkParse:
    """Split a response into reasoning and solution.

    ok iff there is exactly one `think_open ... think_close` block, it comes first
    (only whitespace before it), its content is not blank, and non-blank text follows
    it. Runs in linear time with `str.find`/`str.count` (no regex backtracking), so
    megabyte-long degenerate rollouts are cheap. A chat template that pre-fills
    `<think>` leaves it out of the completion: prepend it before calling.

    >>> parse_think("<think> 2+2 makes 4 </think> The answer is 4.")
    ThinkParse(ok=True, problem=None, reasoning='2+2 makes 4', solution='The answer is 4.')
    >>> parse_think("<think> 2+2 makes 4, so").problem
    'missing </think>'
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    if not think_open or not think_close or think_open in think_close or think_close in think_open:
        # Overlapping tags would make the counts below ambiguous.
        raise ValueError(f"think tags must be non-empty and not contain each other: {think_open!r}, {think_close!r}")

    start = len(completion) - len(completion.lstrip())
    if not completion.startswith(think_open, start):
        return _bad(f"text before {think_open}" if think_open in completion else f"missing {think_open}")
    body = start + len(think_open)
    close = completion.find(think_close, body)
    if close < 0:
        return _bad(f"missing {think_close}")
    if completion.find(think_open, body, close) >= 0:
        return _bad(f"nested {think_open}")
    after = close + len(think_close)
    blocks = 1 + completion.count(think_open, after)
    if blocks > 1:
        return _bad(f"{blocks} think blocks")
    if completion.find(think_close, after) >= 0:
        return _bad(f"stray {think_close}")

    reasoning = completion[body:close].strip()
    solution = completion[after:].strip()
    if not reasoning:
        return _bad("empty think block")
    if not solution:
        return _bad(f"no answer after {think_close}")
    return ThinkParse(ok=True, problem=None, reasoning=reasoning, solution=solution)


def answer_text(completion: str, think_close: str = "</think>") -> str:
    """What a verifier grades: the text after the last `think_close`, so a \\boxed{} guessed
    mid-thought does not count; the whole completion when there is no think block.

    >>> answer_text("<think> maybe 3 </think> so 4")
    ' so 4'
    """
    head, sep, tail = completion.rpartition(think_close)
    return tail if sep else completion


# Finish reasons an engine reports (vLLM / OpenAI names), and whether each means cut off.
_TRUNCATED = {"stop": False, "length": True}


def is_truncated(finish_reason: str | None = None, eos: bool | None = None) -> bool:
    """True when generation did not end on its own (EOS or a stop string).

    Pass exactly one: the engine's `finish_reason` ("stop" or "length"), or `eos`,
    whether the sampled tokens end with the end-of-sequence token. Anything else is
    a ValueError rather than a guess, so a new engine value cannot silently score a
    cut-off response as complete.

    >>> is_truncated("length"), is_truncated("stop"), is_truncated(eos=False)
    (True, False, True)
    """
    if (finish_reason is None) == (eos is None):
        raise ValueError("pass exactly one of finish_reason and eos")
    if eos is not None:
        if not isinstance(eos, bool):
            raise TypeError(f"eos must be bool, got {type(eos).__name__}")
        return not eos
    if finish_reason not in _TRUNCATED:
        raise ValueError(f"unknown finish_reason {finish_reason!r}; expected one of {sorted(_TRUNCATED)}")
    return _TRUNCATED[finish_reason]
