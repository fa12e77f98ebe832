"""pass@k / maj@k maths (hand-computed cases) and `run_eval` end to end on a tiny model."""
from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import pytest

from reason.config import load_config
from reason.eval import EvalConfig, ks_for, metrics, run_eval
from reason.passk import maj_at_k, normalize_answer, pass1_mean, pass_at_k
from reason.records import read_jsonl
from tiny import save_tiny


# ---- pass@k ----

@pytest.mark.parametrize("n,c,k,want", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 1, 4, 1.0),  # n - c = 3 < k: every draw of 4 holds the correct one
    (5, 2, 4, 1.0),
    (5, 0, 1, 0.0), (5, 0, 5, 0.0),  # nothing correct
    (5, 5, 1, 1.0),
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula_everywhere():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # comb(1000, 500) overflows a float; the product form does not.
    exact = 1 - Fraction(comb(990, 500), comb(1000, 500))
    assert pass_at_k(1000, 10, 500) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize("n,c,k", [(5, 2, 6), (5, 2, 0), (5, 6, 1), (5, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass1_mean():
    assert pass1_mean([True, False, True, False, False]) == 0.4
    assert pass1_mean([1.0]) == 1.0
    with pytest.raises(ValueError):
        pass1_mean([])


# ---- maj@k ----

def test_normalize_answer_makes_equal_numbers_equal():
    halves = ["0.5", "1/2", "\\frac{1}{2}", "\\dfrac{2}{4}", " $0.50$ ", "1/2."]
    assert {normalize_answer(a) for a in halves} == {"1/2"}
    assert normalize_answer("1,000") == normalize_answer("1000") == "1000"
    assert normalize_answer("-\\frac{3}{6}") == "-1/2"
    assert normalize_answer("x + 1") == "x+1" and normalize_answer("1,2") == "1,2"


def test_maj_at_k_majority_ties_and_missing_answers():
    # two wrong "7"s outvote one correct
    assert maj_at_k(["3", "7", "7"], [True, False, False], 3) == 0.0
    # k=1 looks at the first sample only
    assert maj_at_k(["3", "7", "7"], [True, False, False], 1) == 1.0
    # tie 1-1 within k=2: the answer seen first wins, either way round
    assert maj_at_k(["3", "7", "7"], [True, False, False], 2) == 1.0
    assert maj_at_k(["7", "3"], [False, True], 2) == 0.0
    # samples without an answer do not vote
    assert maj_at_k([None, None, "3"], [False, False, True], 3) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_maj_at_k_votes_by_equivalence_class_not_by_verdict():
    # "0.5" and "1/2" are one wrong answer with two votes; they beat the single "2"
    assert maj_at_k(["0.5", "2", "1/2"], [False, True, False], 3) == 0.0
    # Where the biased definition (every correct answer votes in one bloc) and the standard one
    # differ: "2^2" and "4" are both right, "5" wrong twice. Biased: 2 correct votes tie 2 wrong
    # ones and the correct bloc came first -> 1.0. Standard: "2^2" and "4" are different answers
    # unless the verifier says they are equal, so "5" wins with 2 votes -> 0.0.
    answers, correct = ["2^2", "4", "5", "5"], [True, True, False, False]
    assert maj_at_k(answers, correct, 4) == 0.0
    assert maj_at_k(answers, correct, 4, same=lambda a, b: {a, b} == {"2^2", "4"}) == 1.0  # tie: first wins
    # and where the bloc would outvote a true plurality: three different right forms, two equal wrong ones
    assert maj_at_k(["4", "2^2", "2+2", "5", "5"], [True, True, True, False, False], 5) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)


# ---- summary metrics ----

def test_ks_for():
    assert ks_for(1) == [1] and ks_for(5) == [1, 2, 4, 5] and ks_for(8) == [1, 2, 4, 8]


def _row(problem, source, correct, answer="1", tokens=10, finish="stop", fmt=True, score=1.0, status="ok"):
    return {"problem": problem, "id": f"p{problem}", "source": source, "correct": correct, "answer": answer,
            "num_tokens": tokens, "finish_reason": finish, "format_ok": fmt, "score": score, "status": status}


def test_metrics_hand_computed():
    groups = [
        [_row(0, "a", True, tokens=4), _row(0, "a", False, "2", tokens=8, finish="length", fmt=False)],
        [_row(1, "b", False, "5", tokens=6), _row(1, "b", False, "5", tokens=30, status="timeout")],
        [_row(2, "b", None, score=None), _row(2, "b", None, score=None)],  # unusable gold: no verdict
    ]
    m = metrics(groups, n=2)
    assert m["problems"] == 3 and m["scored_problems"] == 2 and m["samples"] == 6 and m["unjudged_samples"] == 2
    assert m["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["maj@1"] == pytest.approx(0.5) and m["maj@2"] == pytest.approx(0.5)  # tie in problem 0: first wins
    assert m["mean_tokens"] == pytest.approx(68 / 6) and m["median_tokens"] == 9  # 4 6 8 10 10 30
    assert m["truncation_rate"] == pytest.approx(1 / 6)
    assert m["format_violation_rate"] == pytest.approx(1 / 6)
    assert m["verification_timeouts"] == 1
    assert m["mean_score"] == 1.0


def test_a_verdict_is_the_acc_component_never_the_score():
    from rewards.score import is_correct

    assert is_correct({"score": -0.3, "phi4_plus/acc": 1.0}) is True
    assert is_correct({"score": 0.2, "accuracy/acc": 0.0, "think_format/score": 1.0}) is False
    assert is_correct(None) is None and is_correct({"score": 1.0}) is None


# ---- run_eval end to end (HF engine, tiny model) ----

PARITY_REWARD = '''
def parity(completion, **_):
    ok = len(completion) % 2 == 0
    return {"score": float(ok), "acc": float(ok)}
'''


def test_config_file_loads_the_phi4_protocol():
    cfg = load_config(EvalConfig, "configs/eval/phi4.yaml", ["sampling.max_tokens=64"])
    assert (cfg.sampling.n, cfg.sampling.temperature, cfg.sampling.top_p) == (5, 0.8, 0.95)
    assert cfg.sampling.seed is not None and cfg.sampling.max_tokens == 64


def test_overriding_one_key_keeps_the_protocol_defaults():
    cfg = load_config(EvalConfig, None, ["sampling.n=50", "reward.timeout=3"])
    assert (cfg.sampling.n, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.seed) == (50, 0.8, 0.95, 0)
    assert [t.name for t in cfg.reward.terms] == ["accuracy"] and cfg.reward.timeout == 3


@pytest.mark.slow  # two runs, each starting reward workers that import math-verify
def test_run_eval_twice_gives_identical_summaries(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    # A reward given as file.py:function, like any plugin: half the samples count as correct,
    # so pass@k and maj@k are not trivially 0 on a random model.
    (tmp_path / "parity.py").write_text(PARITY_REWARD)
    overrides = [
        f"model={model}", "engine=hf", "dtype=float32", "problems.synthetic={n: 3, levels: [1, 2]}",
        "chat.system_prompt=null", "sampling.n=4", "sampling.max_tokens=6", "sampling.seed=11",
        f"reward.terms=[{{name: '{tmp_path / 'parity.py'}:parity'}}]", "reward.workers=1",
    ]
    first = run_eval(load_config(EvalConfig, None, overrides + [f"out_dir={tmp_path / 'a'}"]))
    second = run_eval(load_config(EvalConfig, None, overrides + [f"out_dir={tmp_path / 'b'}"]))
    first.pop("config"), second.pop("config")  # differ only in out_dir
    assert first == second
    assert first["n"] == 4 and first["seed"] == 11 and first["model"] == str(model)
    assert first["sampling"] == {"n": 4, "temperature": 0.8, "top_p": 0.95, "max_tokens": 6,
                                 "seed": 11, "stop": None}
    overall = first["overall"]
    assert overall["problems"] == 3 and overall["samples"] == 12
    assert set(overall) >= {"pass@1", "pass@2", "pass@4", "maj@1", "maj@4", "mean_tokens", "median_tokens",
                            "truncation_rate", "format_violation_rate"}
    assert first["by_source"]["synthetic"] == overall

    rows = list(read_jsonl(tmp_path / "a" / "samples.jsonl"))
    assert len(rows) == 12 and [r["sample"] for r in rows[:4]] == [0, 1, 2, 3]
    assert all(r["correct"] == (len(r["completion"]) % 2 == 0) for r in rows)
    assert overall["pass@1"] == pytest.approx(sum(r["correct"] for r in rows) / 12)
    assert overall["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / 12)
    assert overall["format_violation_rate"] == 1.0  # a random model writes no <think> block
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["overall"] == overall


def test_a_problem_is_scored_by_any_verdict_and_a_missing_one_never_crashes():
    """Before, whether a problem counted hung on its first sample, and a None verdict on a later
    sample crashed pass1_mean."""
    groups = [
        [_row(0, "a", None, score=None), _row(0, "a", True), _row(0, "a", False)],  # first sample unjudged
        [_row(1, "a", True), _row(1, "a", None, score=None), _row(1, "a", True)],  # a later one unjudged
    ]
    m = metrics(groups, n=3)
    assert m["scored_problems"] == 2 and m["unjudged_samples"] == 2
    assert m["pass@1"] == pytest.approx((1 / 2 + 1.0) / 2)  # over each problem's judged samples
    assert m["pass@2"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["pass@3"] is None  # no problem has 3 judged samples: nothing to average
