"""Think-block parsing, truncation, and the repeated n-gram penalty."""
import doctest
import random

import pytest

import rewards.format
import rewards.repetition
from rewards.format import ThinkParse, is_truncated, parse_think
from rewards.repetition import repetition_penalty


def test_docstring_examples():
    assert doctest.testmod(rewards.format).failed == 0
    assert doctest.testmod(rewards.repetition).failed == 0


def test_parse_ok():
    got = parse_think("\n  <think>\nLet x = 2.\nThen x^2 = 4.\n</think>\n\nThe answer is $\\boxed{4}$.\n")
    assert got == ThinkParse(True, None, "Let x = 2.\nThen x^2 = 4.", "The answer is $\\boxed{4}$.")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("The answer is 4.", "missing <think>"),
        ("", "missing <think>"),
        ("reasoning </think> answer", "missing <think>"),  # template pre-filled <think>
        ("Sure! <think> r </think> a", "text before <think>"),
        ("<<think>> r </think> a", "text before <think>"),
        ("<think> r, and the answer is 4", "missing </think>"),
        ("<think> r </thinK> a", "missing </think>"),  # garbled close tag
        ("<think>   \n </think> a", "empty think block"),
        ("<think></think>a", "empty think block"),
        ("<think> r </think>  \n", "no answer after </think>"),
        ("<think> r </think>", "no answer after </think>"),
        ("<think> a </think> b <think> c </think> d", "2 think blocks"),
        ("<think> a </think> b <think> c </think> d <think> e", "3 think blocks"),
        ("<think> a <think> b </think> c </think> d", "nested <think>"),
        ("<think> a </think> b </think> c", "stray </think>"),
    ],
)
def test_parse_malformed(text, problem):
    got = parse_think(text)
    assert got == ThinkParse(False, problem, "", "")


def test_parse_custom_tags_and_bad_tags():
    got = parse_think("<|think|>r<|/think|>a", "<|think|>", "<|/think|>")
    assert (got.ok, got.reasoning, got.solution) == (True, "r", "a")
    assert parse_think("<think> r </think> a", "[T]", "[/T]").problem == "missing [T]"
    for open_, close in [("", "</think>"), ("<think>", ""), ("<t>", "<t>"), ("think", "</think>")]:
        with pytest.raises(ValueError):
            parse_think("x", open_, close)
    with pytest.raises(TypeError):
        parse_think(None)


def test_parse_huge_inputs():
    blob = "so 1+1 is 2; " * 80_000  # ~1 MB
    got = parse_think(f"<think>{blob}</think> The answer is 2.")
    assert got.ok and got.solution == "The answer is 2." and len(got.reasoning) > 1_000_000 - 20
    assert parse_think("<think>" + blob).problem == "missing </think>"
    assert parse_think("<think>" * 100_000 + "x").problem == "missing </think>"
    assert parse_think("<think>x</think>" * 70_000).problem == "70000 think blocks"


def test_is_truncated():
    assert is_truncated("length") is True
    assert is_truncated("stop") is False
    assert is_truncated(eos=True) is False
    assert is_truncated(eos=False) is True
    for bad in ["eos", "abort", "", "LENGTH"]:
        with pytest.raises(ValueError, match="unknown finish_reason"):
            is_truncated(bad)
    with pytest.raises(ValueError):
        is_truncated()
    with pytest.raises(ValueError):
        is_truncated("stop", eos=True)
    with pytest.raises(TypeError):
        is_truncated(eos=1)


NORMAL = (
    "We need the sum of the roots of x^2 - 5x + 6 = 0. By Vieta's formulas the sum of the roots "
    "equals the negated coefficient of x divided by the leading coefficient, which gives 5. "
    "Checking directly, the polynomial factors as (x - 2)(x - 3), with roots 2 and 3, and indeed "
    "2 + 3 = 5. So the answer is 5."
)


def test_repetition_normal_text_is_zero():
    assert repetition_penalty(NORMAL) == 0.0
    assert repetition_penalty("") == 0.0
    assert repetition_penalty("too short") == 0.0


def test_repetition_looping_text_is_strongly_negative():
    # a loop on one 5-word phrase scores the floor
    assert repetition_penalty("Let me check this again. " * 200) == -1.0
    # after a 65-word preamble: the phrase-aligned 5-gram occurs 200 times in 1065 words
    assert repetition_penalty(NORMAL + " Let me check this again." * 200) == pytest.approx(-200 / (1065 / 5))
    # a 6-word loop: each 5-gram recurs once per 6 words, about 5/6 of the floor
    assert repetition_penalty(NORMAL + " Wait, let me check that again." * 200) < -0.75
    # a long repeated paragraph: loop term = count / (#words / 5), well below -0.1
    assert repetition_penalty(NORMAL + (" " + NORMAL) * 9) <= -0.1


def test_repetition_hand_computed():
    # words x y x y x y z w v u t s: 11 bigrams, (x y) seen 3 times, (y x) twice.
    # threshold 2: only (x y) repeats; spread 1/11, loop 3 / (12 / 2) = 0.5.
    assert repetition_penalty("x y x y x y z w v u t s", n=2, threshold=2) == pytest.approx(-0.5)
    # unigrams a a b b c c, threshold 1: spread 3/6 = 0.5 beats loop 2 / 6.
    assert repetition_penalty("a a b b c c", n=1, threshold=1) == pytest.approx(-0.5)
    # the threshold is strict: 3 occurrences do not exceed 3
    assert repetition_penalty("x y x y x y z w v u t s", n=2, threshold=3) == 0.0


def test_repetition_bad_arguments():
    for kwargs in [dict(n=0), dict(n=2.0), dict(threshold=-1), dict(threshold=True)]:
        with pytest.raises(ValueError):
            repetition_penalty("a b c", **kwargs)
    with pytest.raises(TypeError):
        repetition_penalty(b"a b c")


def test_repetition_one_megabyte():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5_000)]
    text = " ".join(rng.choice(vocab) for _ in range(200_000))  # ~1 MB of varied words
    assert len(text) > 1_000_000
    assert repetition_penalty(text) == 0.0
    assert repetition_penalty("again and again " * 70_000) == -1.0
