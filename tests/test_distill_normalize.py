"""Trace normalisation: R1-style, o3-mini-style and plain chain-of-thought responses
become one canonical `<think> reasoning </think> answer` form (distill/normalize.py)."""
from __future__ import annotations

import pytest

from distill.normalize import normalize, split_plain
from reason.chat import ChatConfig, format_response
from rewards.format import parse_think


def _canonical_ok(norm) -> None:
    """The rendered trace is one well-formed think block, as the format reward reads it."""
    parsed = parse_think(format_response(norm.reasoning, norm.answer, ChatConfig()))
    assert (parsed.ok, parsed.reasoning, parsed.solution) == (True, norm.reasoning, norm.answer)


def test_normalize_r1_reasoning_field():
    norm = normalize("The answer is \\boxed{4}.", "2 + 2 = 4, checked twice.\n")
    assert (norm.ok, norm.style, norm.reasoning, norm.answer) == (
        True, "field", "2 + 2 = 4, checked twice.", "The answer is \\boxed{4}.")
    _canonical_ok(norm)


def test_normalize_o3_mini_summary_and_hidden_reasoning():
    summary = normalize("So x = 3.\n\n**Answer:** 3", "**Solving** the linear equation")
    assert (summary.style, summary.reasoning, summary.answer) == (
        "field", "**Solving** the linear equation", "So x = 3.\n\n**Answer:** 3")
    hidden = normalize("Subtract 2 from both sides: 3x = 9.\nDivide by 3.\n**Answer:** 3")
    assert (hidden.style, hidden.reasoning, hidden.answer) == (
        "plain", "Subtract 2 from both sides: 3x = 9.\nDivide by 3.", "**Answer:** 3")
    _canonical_ok(summary)
    _canonical_ok(hidden)


def test_normalize_think_tags_in_content():
    norm = normalize("<think>\nadd them: 5\n</think>\n\nThe sum is \\boxed{5}.")
    assert (norm.style, norm.reasoning, norm.answer) == ("think", "add them: 5", "The sum is \\boxed{5}.")
    # A template that pre-fills <think> leaves only the close tag in the completion.
    prefilled = normalize("add them: 5\n</think>\nThe sum is \\boxed{5}.")
    assert (prefilled.ok, prefilled.reasoning, prefilled.answer) == (True, "add them: 5", "The sum is \\boxed{5}.")
    custom = normalize("[T] r [/T] a \\boxed{1}", think_open="[T]", think_close="[/T]")
    assert (custom.reasoning, custom.answer) == ("r", "a \\boxed{1}")
    _canonical_ok(norm)


def test_normalize_plain_chain_of_thought_splits_at_the_final_answer_line():
    text = "First, 12 * 3 = 36.\nThen 36 + 4 = 40.\nSo the total is \\boxed{40}.\nThat's all."
    norm = normalize(text)
    assert (norm.style, norm.reasoning, norm.answer) == (
        "plain", "First, 12 * 3 = 36.\nThen 36 + 4 = 40.", "So the total is \\boxed{40}.\nThat's all.")
    # A box mentioned mid-way is reasoning; only the last one ends it.
    twice = normalize("Try \\boxed{1}? No.\nRecheck: 2.\nFinal: \\boxed{2}")
    assert (twice.reasoning, twice.answer) == ("Try \\boxed{1}? No.\nRecheck: 2.", "Final: \\boxed{2}")
    # A box wrapped over lines stays whole, and an "Answer:" heading keeps its value.
    wrapped = normalize("Stack the rows.\n\\boxed{\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}}")
    assert wrapped.answer == "\\boxed{\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}}"
    heading = normalize("Count them.\nFinal answer is:\n7")
    assert (heading.reasoning, heading.answer) == ("Count them.", "Final answer is:\n7")
    _canonical_ok(norm)
    _canonical_ok(wrapped)


@pytest.mark.parametrize("content,reasoning,problem", [
    ("<think>\nno end", None, "missing </think>"),
    ("<think>\n\n</think>\nx \\boxed{1}", None, "empty think block"),
    ("<think>a</think> b <think>c</think> d", None, "2 think blocks"),
    ("just words, no answer", None, "no think block, reasoning field or final \\boxed{} answer"),
    ("\\boxed{3}", None, "no reasoning before the final answer line"),
    ("", "thought a lot", "empty answer after the reasoning field"),
    ("<think>x</think> \\boxed{1}", "r", "think tag inside the answer field"),
    ("\\boxed{1}", "r </think>", "think tag inside the reasoning field"),
])
def test_normalize_rejects_what_cannot_be_split(content, reasoning, problem):
    norm = normalize(content, reasoning)
    assert (norm.ok, norm.problem, norm.reasoning, norm.answer) == (False, problem, "", "")


def test_split_plain_none_without_a_final_answer():
    assert split_plain("a\nb\nc") is None
