"""Distillation filters (verified-correct, format, length, dedup, decontamination) and DPO pairs."""
from __future__ import annotations

import json

import pytest

from distill.dedup import DecontamOptions, DedupOptions, filter_contaminated, filter_duplicates, normalize_words
from distill.filters import (
    LengthOptions,
    VerifyOptions,
    filter_format,
    filter_length,
    filter_verified,
    response_text,
    verify_scorer,
)
from distill.pairs import PairOptions, preference_pairs
from distill.synthetic import synthetic_trace
from reason.chat import ChatConfig
from reason.records import Problem, Rollout, Trace, read_jsonl, write_jsonl
from reason.synthetic import KINDS, LEVELS, generate_problems

VERIFY = VerifyOptions(workers=2, timeout=20.0)
CHAT = ChatConfig()


def problem(pid: str, prompt: str, gold: str | None = "4") -> Problem:
    return Problem(id=pid, prompt=prompt, ground_truth=gold)


def trace(p: Problem, reasoning: str, answer: str, sample: int = 0, **sampling) -> Trace:
    return Trace(problem=p, sample=sample, reasoning=reasoning, answer=answer, teacher="t", sampling=sampling)


@pytest.fixture(scope="module")
def pool():
    with verify_scorer(VERIFY, CHAT) as p:  # started once: spawning math-verify workers takes seconds
        yield p


@pytest.fixture(scope="module")
def synthetic():
    return generate_problems(40, seed=11, levels=LEVELS)  # every kind, level 0 included


def test_synthetic_traces_pass_verified_and_format_filters(synthetic, pool):
    assert {p.metadata["kind"] for p in synthetic} == set(KINDS)  # every answer format meets math-verify
    good = [synthetic_trace(p, seed=1) for p in synthetic]
    kept, dropped, report = filter_verified(good, pool)
    assert kept == good and not dropped and report.dropped == {}
    kept, dropped, report = filter_format(good, CHAT)
    assert kept == good and report.kept == report.seen == 40


def test_mistaken_traces_fail_verification(synthetic, pool):
    wrong = [synthetic_trace(p, seed=1, mistake_rate=1.0) for p in synthetic]
    kept, dropped, report = filter_verified(wrong, pool)
    assert kept == [] and report.dropped == {"incorrect": 40}
    assert [d.record for d in dropped] == wrong and all(d.reason == "incorrect" for d in dropped)


def test_verification_statuses_bad_gold_and_no_answer(pool):
    records = [
        trace(problem("a", "2+2?"), "2+2=4", "\\boxed{4}"),
        trace(problem("b", "2+2?", gold=None), "2+2=4", "\\boxed{4}"),
        trace(problem("c", "2+2?", gold="\\frac{"), "2+2=4", "\\boxed{4}"),
        trace(problem("d", "2+2?"), "hmm", "I do not know."),
        Rollout(problem=problem("e", "2+2?"), completion="<think>\\boxed{5} no, 2+2=4</think> \\boxed{4}"),
        Rollout(problem=problem("f", "2+2?"), completion="<think>2+2=4 so \\boxed{4}</think> Done."),
    ]
    kept, dropped, report = filter_verified(records, pool)
    assert [_id(r) for r in kept] == ["a", "e"]
    assert {_id(d.record): d.reason for d in dropped} == {"b": "bad_gold", "c": "bad_gold", "d": "no_answer",
                                                          "f": "no_answer"}
    assert report.dropped == {"bad_gold": 2, "no_answer": 2}
    assert (report.name, report.kept, report.seen) == ("verified", 2, 6)


def _id(rec) -> str:
    return rec.id if isinstance(rec, Problem) else rec.problem.id


def test_format_filter_drops_truncated_and_malformed():
    p = problem("p", "Q")
    records = [
        trace(p, "fine", "\\boxed{4}"),
        trace(p, "fine", "\\boxed{4}", sample=1, finish_reason="length"),
        trace(p, "  ", "\\boxed{4}", sample=2),
        trace(p, "a </think> b", "\\boxed{4}", sample=3),
        Rollout(problem=p, completion="<think>ok</think> 4"),
        Rollout(problem=p, completion="<think>ok</think> 4", finish_reason="length"),
        Rollout(problem=p, completion="<think>never closed"),
    ]
    kept, dropped, report = filter_format(records, CHAT)
    assert kept == [records[0], records[4]]
    assert [(d.reason, d.detail) for d in dropped] == [
        ("truncated", "finish_reason=length"), ("bad_format", "empty think block"),
        ("bad_format", "stray </think>"), ("truncated", "finish_reason=length"),
        ("bad_format", "missing </think>")]
    assert report.dropped == {"truncated": 2, "bad_format": 3}


def test_length_filter_counts_tokens_not_characters():
    count_words = lambda s: len(s.split())  # noqa: E731  a stand-in tokenizer: one token per word
    p = problem("p", "one two three")
    long_word = trace(p, "x" * 500, "y")  # 500 characters, few tokens
    many = trace(p, " ".join(["w"] * 30), "y", sample=1)
    ids = Rollout(problem=p, completion="a b", token_ids=list(range(40)))
    kept, dropped, report = filter_length([long_word, many, ids], LengthOptions(max_tokens=20), count_words, CHAT)
    assert kept == [long_word]
    assert [(d.reason, d.detail) for d in dropped] == [("too_long", "33 tokens > 20"), ("too_long", "40 tokens > 20")]
    assert report.details["max_tokens"] == 40
    kept, dropped, _ = filter_length([long_word], LengthOptions(min_tokens=5, include_prompt=True), count_words, CHAT)
    assert kept == [long_word]  # 4 response tokens + 3 prompt tokens
    kept, dropped, _ = filter_length([p], LengthOptions(min_tokens=4), count_words, CHAT)
    assert dropped[0].reason == "too_short"


LONG = ("A rectangular garden is twice as long as it is wide and its perimeter is sixty metres. "
        "A path one metre wide runs around the outside of the garden. Find the area of the path "
        "in square metres, and explain each step of the calculation carefully. Give the answer as a "
        "whole number, state the width and the length of the garden first, and then draw a small "
        "sketch of the garden with the path around it.")


def test_dedup_exact_and_near():
    near = LONG.replace("sixty", "seventy")
    records = [
        problem("a", LONG),
        problem("b", LONG.upper().replace(",", " ;  ")),  # same after normalising
        problem("c", near),  # one word changed in 77: Jaccard of 5-gram shingles 0.87
        problem("d", "What is 4827 + 3596?"),
        problem("e", "What is 4827 + 3597?"),  # short: a changed number is a different problem
        problem("f", " ".join(reversed(LONG.split()))),  # same words, different order
    ]
    kept, dropped, report = filter_duplicates(records)
    assert [r.id for r in kept] == ["a", "d", "e", "f"]
    assert [(d.record.id, d.reason) for d in dropped] == [("b", "duplicate"), ("c", "near_duplicate")]
    assert dropped[0].detail == "same text as a" and dropped[1].detail == "Jaccard 0.87 with a"
    kept, dropped, _ = filter_duplicates(records, DedupOptions(near=False))
    assert [r.id for r in kept] == ["a", "c", "d", "e", "f"]


def test_dedup_of_traces_compares_prompt_and_response(synthetic):
    t0 = synthetic_trace(synthetic[0], sample=0)
    t1 = synthetic_trace(synthetic[0], sample=1)  # same text: the synthetic teacher is deterministic
    t2 = synthetic_trace(synthetic[1])
    kept, dropped, _ = filter_duplicates([t0, t1, t2])
    assert kept == [t0, t2] and dropped[0].detail == f"same text as {synthetic[0].id}#0"


def test_normalize_words():
    assert normalize_words("The  QUICK,brown-fox!\njumps.") == ["the", "quick", "brown", "fox", "jumps"]
    assert normalize_words("Is 3x-2 = (7)?") == ["is", "3x", "-", "2", "=", "(", "7", ")"]
    assert normalize_words("2 * (3 + 4)") != normalize_words("2 * 3 + 4") != normalize_words("2 * 3 - 4")


EVAL_A = ["Let x be the number of red balls in the urn after three draws without replacement.",
          "Compute 2 + 2."]
EVAL_B = ["Find the largest prime factor of the sum of all positive divisors of 2024 quickly."]


@pytest.fixture()
def eval_files(tmp_path):
    a, b = tmp_path / "aime.jsonl", tmp_path / "math500.jsonl"
    write_jsonl(a, [{"problem": t, "answer": "1"} for t in EVAL_A])
    write_jsonl(b, [{"question": t} for t in EVAL_B])  # eval files need no answers here
    return [str(a), str(b)]


def test_decontamination_drops_planted_overlaps_and_keeps_near_misses(eval_files):
    records = [
        # the 8-gram "largest prime factor of the sum of all" inside a longer text, other case/punctuation
        problem("planted", "Warm-up: what is the LARGEST prime-factor of THE sum, of all... integers below 10?"),
        problem("planted2", "let X be the number of RED balls in the urn; then stop."),
        problem("seven", "What is the largest prime factor of the sum 91 + 12?"),  # 7 shared words in a row
        problem("reordered", "Quickly find, of all positive divisors of 2024, the sum; then its largest prime factor."),
        problem("short", "compute 2+2"),  # an eval problem under 8 words, matched whole
        problem("short_inside", "Compute 2 + 2 and then add 5."),  # not whole: kept
    ]
    kept, dropped, report = filter_contaminated(records, DecontamOptions(eval_files=eval_files))
    assert [r.id for r in kept] == ["seven", "reordered", "short_inside"]
    assert {d.record.id: d.reason for d in dropped} == dict.fromkeys(["planted", "planted2", "short"], "contaminated")
    assert dropped[0].detail == "shares 8-gram 'the largest prime factor of the sum of' with math500.jsonl"
    assert "aime.jsonl" in dropped[1].detail
    assert report.details["by_eval_file"] == {"math500.jsonl": 1, "aime.jsonl": 2}
    kept, _, _ = filter_contaminated(records, DecontamOptions(eval_files=eval_files, n=7))
    assert "seven" not in [r.id for r in kept]


def test_decontamination_checks_the_problem_of_traces(eval_files):
    p = problem("t", EVAL_B[0] + " Show your work.")
    kept, dropped, _ = filter_contaminated([trace(p, "r", "\\boxed{4}")], DecontamOptions(eval_files=eval_files))
    assert kept == [] and dropped[0].reason == "contaminated"


def test_dropped_records_round_trip_through_jsonl(tmp_path, synthetic, pool):
    wrong = [synthetic_trace(p, mistake_rate=1.0) for p in synthetic[:2]]
    _, dropped, report = filter_verified(wrong, pool)
    write_jsonl(tmp_path / "dropped.jsonl", dropped)
    rows = list(read_jsonl(tmp_path / "dropped.jsonl"))
    assert [r["reason"] for r in rows] == ["incorrect", "incorrect"]
    assert Trace.model_validate(rows[0]["record"]) == wrong[0]
    assert json.loads(report.model_dump_json())["dropped"] == {"incorrect": 2}


# ---------------------------------------------------------------- preference pairs

def test_preference_pairs_chosen_correct_rejected_incorrect(synthetic, pool):
    problems = synthetic[:6]
    traces = [synthetic_trace(p, sample=s, mistake_rate=0.5) for p in problems for s in range(6)]
    traces.append(synthetic_trace(synthetic[6], sample=0))  # only a correct response: no pair
    opts = PairOptions(max_pairs_per_problem=3, seed=5, verify=VERIFY)
    pairs, dropped, report = preference_pairs(traces, opts, pool)
    assert pairs, "mistake_rate 0.5 over 6 samples should give both sides for most problems"
    by_id = {p.id: p for p in problems}
    for pair in pairs:
        gold = by_id[pair.problem.id].ground_truth
        assert pair.chosen.endswith(f"\\boxed{{{gold}}}.") and pair.chosen.startswith("<think>\n")
        assert not pair.rejected.endswith(f"\\boxed{{{gold}}}.")
        assert pair.metadata["rejected_status"] == "incorrect"
    per_problem = {}
    for pair in pairs:
        per_problem.setdefault(pair.problem.id, []).append((pair.metadata["chosen_sample"],
                                                            pair.metadata["rejected_sample"]))
    assert all(len(v) <= 3 and len(set(v)) == len(v) for v in per_problem.values())
    assert ("no_incorrect", synthetic[6].id) in [(d.reason, d.record.id) for d in dropped]
    assert report.kept == len(pairs) and report.details["problems"] == 7
    again, _, _ = preference_pairs(traces, opts, pool)
    assert again == pairs


class Labels:
    """A scorer stand-in that gives the records these verification statuses."""

    think_open, think_close = CHAT.think_open, CHAT.think_close

    def __init__(self, statuses: list[str]):
        self.statuses = statuses

    def verify(self, items) -> list[str]:
        return self.statuses


def test_pairs_use_every_combination_when_allowed():
    p = problem("p", "Q")
    good = [trace(p, "r", f"\\boxed{{4}} v{i}", sample=i) for i in range(2)]
    bad = [trace(p, "r", f"\\boxed{{5}} v{i}", sample=2 + i) for i in range(3)]
    records, labels = good + bad + bad[:1], Labels(["correct"] * 2 + ["incorrect"] * 3 + ["timeout"])
    pairs = preference_pairs(records, PairOptions(max_pairs_per_problem=100, chat=CHAT), labels).kept
    cells = {(x.metadata["chosen_sample"], x.metadata["rejected_sample"]) for x in pairs}
    assert len(pairs) == 6 and cells == {(c, r) for c in (0, 1) for r in (2, 3, 4)}
    assert pairs[0].chosen == response_text(good[pairs[0].metadata["chosen_sample"]], CHAT)
    assert len(preference_pairs(records, PairOptions(max_pairs_per_problem=2, chat=CHAT), labels).kept) == 2
