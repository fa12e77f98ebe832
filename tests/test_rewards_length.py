"""Length-shaped rewards: Phi-4 golden values, format overrides, DAPO, open-r1 cosine."""
import doctest
import math

import pytest

import rewards.length
from rewards.length import (
    LengthSpec,
    cosine_length_reward,
    dapo_overlong_penalty,
    length_aware_accuracy,
    phi4_accuracy_scaled,
)


def test_docstring_examples():
    assert doctest.testmod(rewards.length).failed == 0


@pytest.mark.parametrize(
    "correct, tokens, expected",
    [
        (True, 0, 1.0),
        (True, 25_600, 1.0),
        (True, 28_672, 0.75),
        (True, 31_744, 0.5),
        (True, 40_000, 0.5),  # clamped past L_max
        (False, 0, -1.0),
        (False, 1_851, -0.75),
        (False, 3_702, -0.5),
        (False, 31_744, -0.5),
    ],
)
def test_paper_endpoints(correct, tokens, expected):
    assert length_aware_accuracy(correct, tokens) == pytest.approx(expected, abs=1e-12)


def test_hand_computed_interior_points():
    # correct, a quarter of the way into the decay: 0.5 + 0.25 * (1 + cos(pi/4))
    assert length_aware_accuracy(True, 25_600 + 1_536) == pytest.approx(0.5 + 0.25 * (1 + math.sqrt(0.5)))
    # incorrect, a quarter of the way to L_neg: -0.5 - 0.25 * (1 + cos(pi/4))
    assert length_aware_accuracy(False, 3_702 // 4) == pytest.approx(
        -0.5 - 0.25 * (1 + math.cos(math.pi * (3_702 // 4) / 3_702))
    )


def test_monotone_between_endpoints():
    correct = [length_aware_accuracy(True, n) for n in range(25_600, 31_745, 64)]
    wrong = [length_aware_accuracy(False, n) for n in range(0, 3_703, 17)]
    assert all(a > b for a, b in zip(correct, correct[1:]))
    assert all(a < b for a, b in zip(wrong, wrong[1:]))
    assert min(correct) >= 0.5 and max(wrong) <= -0.5


def test_custom_spec():
    spec = LengthSpec(l_max=100, l_pos=50, l_neg=10, r_pos_min=0.0, r_neg_max=0.0)
    assert length_aware_accuracy(True, 75, spec) == pytest.approx(0.5)
    assert length_aware_accuracy(False, 5, spec) == pytest.approx(-0.5)


@pytest.mark.parametrize("bad", [-1, 1.0, 2.5, "10", None, True])
def test_rejects_non_token_counts(bad):
    with pytest.raises((TypeError, ValueError)):
        length_aware_accuracy(True, bad)
    with pytest.raises((TypeError, ValueError)):
        dapo_overlong_penalty(bad, 100, 10)
    with pytest.raises((TypeError, ValueError)):
        cosine_length_reward(True, bad, 100)


def test_rejects_non_bool_correctness():
    with pytest.raises(TypeError):
        length_aware_accuracy(1.0, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(l_pos=31_744),
        dict(l_pos=-1),
        dict(l_neg=0),
        dict(l_max=31_744.0),
        dict(r_pos_min=1.5),
        dict(r_neg_min=-0.2),
        dict(r_neg_max=0.6),
        dict(r_pos_max=math.inf),
        dict(r_truncated="x"),
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises((TypeError, ValueError)):
        LengthSpec(**kwargs)


def test_format_overrides():
    assert phi4_accuracy_scaled(True, 1_000, truncated=True, think_ok=True) == -0.5
    assert phi4_accuracy_scaled(True, 1_000, truncated=False, think_ok=False) == -1.0
    assert phi4_accuracy_scaled(False, 500, truncated=False, think_ok=False) == -1.0
    # both hold: truncation takes precedence (documented in the function)
    assert phi4_accuracy_scaled(True, 31_744, truncated=True, think_ok=False) == -0.5
    # no override: the length-aware value
    assert phi4_accuracy_scaled(True, 28_672, truncated=False, think_ok=True) == pytest.approx(0.75)
    assert phi4_accuracy_scaled(False, 1_851, truncated=False, think_ok=True) == pytest.approx(-0.75)
    spec = LengthSpec(r_truncated=-0.25, r_bad_format=-2.0)
    assert phi4_accuracy_scaled(True, 10, truncated=True, think_ok=True, spec=spec) == -0.25
    assert phi4_accuracy_scaled(True, 10, truncated=False, think_ok=False, spec=spec) == -2.0
    with pytest.raises(TypeError):
        phi4_accuracy_scaled(True, 10, truncated="length", think_ok=True)
    with pytest.raises(ValueError):
        phi4_accuracy_scaled(True, -3, truncated=True, think_ok=True)


@pytest.mark.parametrize(
    "tokens, expected",
    [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0), (10_000, -1.0)],
)
def test_dapo_overlong(tokens, expected):
    assert dapo_overlong_penalty(tokens, max_len=100, cache_len=20) == pytest.approx(expected)


def test_dapo_zero_cache_is_a_hard_step():
    assert dapo_overlong_penalty(100, 100, 0) == 0.0
    assert dapo_overlong_penalty(101, 100, 0) == -1.0
    with pytest.raises(ValueError):
        dapo_overlong_penalty(10, 100, 101)
    with pytest.raises(ValueError):
        dapo_overlong_penalty(10, 0, 0)


def _open_r1(correct, gen_len, max_len, min_w=-1.0, max_w=-0.5, min_c=0.5, max_c=1.0):
    # open-r1's formula, written out independently of the implementation under test.
    cosine = math.cos(gen_len / max_len * math.pi)
    lo, hi = (min_c, max_c) if correct else (max_w, min_w)
    return lo + 0.5 * (hi - lo) * (1.0 + cosine)


@pytest.mark.parametrize(
    "correct, tokens, expected",
    [
        (True, 0, 1.0),
        (True, 250, 0.5 + 0.25 * (1 + math.sqrt(0.5))),
        (True, 500, 0.75),
        (True, 1000, 0.5),
        (False, 0, -1.0),
        (False, 500, -0.75),
        (False, 1000, -0.5),
        (True, 2000, 1.0),  # unclamped, as in open-r1: the cosine comes back round
    ],
)
def test_cosine_hand_computed(correct, tokens, expected):
    assert cosine_length_reward(correct, tokens, max_len=1000) == pytest.approx(expected)


def test_cosine_matches_open_r1_with_custom_values():
    values = dict(min_value_wrong=-0.8, max_value_wrong=-0.1, min_value_correct=0.1, max_value_correct=0.9)
    for correct in (True, False):
        for n in (0, 7, 333, 640, 999, 1000, 1500):
            got = cosine_length_reward(correct, n, 1000, **values)
            assert got == pytest.approx(_open_r1(correct, n, 1000, -0.8, -0.1, 0.1, 0.9))
    with pytest.raises(ValueError):
        cosine_length_reward(True, 1, 0)
