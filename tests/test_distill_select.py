"""Teachable-prompt selection (distill/select.py): the pure maths exactly, then real runs.

The end-to-end runs sample from a tiny random model through Hugging Face generate,
and from an OpenAI-compatible HTTP server on 127.0.0.1 whose answers are scripted
per problem, so the pass rates, band and histogram are known exactly.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distill.filters import VerifyOptions, verify_scorer
from distill.select import SelectConfig, measure, pass_rate, rate_histogram, select_teachable
from reason.chat import ChatConfig
from reason.config import ConfigError, load_config
from reason.passk import band_verdict, equivalence_pairs, is_number, plurality, vote_keys
from reason.records import Problem, Rollout
from tiny import save_tiny

# ---------------------------------------------------------------- pure parts


def test_pass_rate_counts_verdicts_and_leaves_out_failed_checks():
    assert pass_rate(["correct", "incorrect", "no_answer", "correct"]) == 0.5
    assert pass_rate(["correct", "timeout", "error"]) == 1.0
    assert pass_rate(["incorrect"] * 8) == 0.0
    assert pass_rate(["timeout", "bad_gold"]) is None
    assert pass_rate([]) is None


def test_is_number_and_vote_keys():
    assert [is_number(k) for k in ("3", "-1/2", "0.25", "x+1", "Paris", "1/0")] == [True, True, True, False, False,
                                                                                    False]
    assert vote_keys(["0.5", "\\frac{1}{2}", "1,000", "x + 1", None]) == ["1/2", "1/2", "1000", "x+1", None]


def test_plurality_groups_equal_numbers_and_ignores_missing_answers():
    assert plurality(["0.5", "\\frac{1}{2}", "1/2", "3", None, None, "3", "4"]) == (0, 3)
    assert plurality([None, None]) == (None, 0) and plurality([]) == (None, 0)
    assert plurality(["7"]) == (0, 1)


def test_plurality_tie_goes_to_the_answer_seen_first():
    assert plurality(["4", "3", "3", "4", "5"]) == (0, 2)
    assert plurality(["3", "4", "4", "3", "5"]) == (0, 2)
    assert plurality(["5", "4", "3", "3", "4"]) == (1, 2)


def test_plurality_merges_groups_only_through_same_and_never_two_numbers():
    calls = []

    def same(a: str, b: str) -> bool:
        calls.append((a, b))
        return {a, b} == {"x+1", "1+x"}

    answers = ["7", "x + 1", "7", "1+x", "1+x", "8"]
    assert plurality(answers, same) == (1, 3)  # "x + 1" (sample 1) joins 1+x: 3 votes
    # Ranked: 7 (2), 1+x (2), x+1 (1), 8 (1); the number pair (7, 8) is never asked.
    assert calls == [("7", "1+x"), ("7", "x+1"), ("1+x", "x+1"), ("1+x", "8")]
    assert all(not (is_number(a) and is_number(b)) for a, b in calls)
    assert plurality(answers) == (0, 2)


def test_equivalence_pairs_are_ranked_and_skip_number_pairs():
    keys = ["7", "x+1", "7", "1+x", "1+x", "8", None]
    assert equivalence_pairs(keys) == [("7", "1+x"), ("7", "x+1"), ("1+x", "x+1"), ("1+x", "8"), ("x+1", "8")]
    assert equivalence_pairs(["1", "2", "3"]) == []


def test_band_keeps_edges_and_names_the_side():
    band = (0.1, 0.6)
    assert [k for k in range(9) if band_verdict(k / 8, band) is None] == [1, 2, 3, 4]  # open-r1's n=8 band
    assert [k for k in range(11) if band_verdict(k / 10, band) is None] == [1, 2, 3, 4, 5, 6]  # edges kept
    assert band_verdict(0.0, band)[0] == "too_hard"
    assert band_verdict(5 / 8, band) == ("too_easy", "pass rate 0.625 > 0.6")
    assert band_verdict(1.0, (0.0, 1.0)) is None


def test_rate_histogram_bins():
    assert rate_histogram([0.0, 0.1, 0.3, 0.7, 0.99, 1.0], 10) == [1, 1, 0, 1, 0, 0, 0, 1, 0, 2]
    assert rate_histogram([k / 8 for k in range(9)], 4) == [2, 2, 2, 3]
    assert rate_histogram([], 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        rate_histogram([1.5], 10)


def test_band_must_be_ordered_inside_0_1():
    assert load_config(SelectConfig, None, ["band=[0.2, 0.7]"]).band == (0.2, 0.7)
    with pytest.raises(ConfigError, match="band"):
        load_config(SelectConfig, None, ["band=[0.7, 0.2]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(SelectConfig, None, ["samples=4"])


# ---------------------------------------------------------------- measuring, with the real verifier pool

def _rollouts(problem: Problem, answers: list[str]) -> list[Rollout]:
    return [Rollout(problem=problem, completion=a) for a in answers]


@pytest.fixture(scope="module")
def scorer():
    with verify_scorer(VerifyOptions(workers=1), ChatConfig()) as s:
        yield s


def test_measure_against_gold_reference_bad_gold_and_no_samples(scorer):
    from distill.select import Reference

    gold = Problem(id="g", prompt="2 + 3?", ground_truth="5")
    open_ = Problem(id="o", prompt="Simplify 1 + x.")
    bad = Problem(id="b", prompt="?", ground_truth="???")
    empty = Problem(id="e", prompt="4 + 4?", ground_truth="8")
    unsure = Problem(id="u", prompt="Pick a number.")
    groups = [
        _rollouts(gold, ["\\boxed{5}", "\\boxed{4}", "no idea", "<think>\\boxed{5}</think> so \\boxed{6}"]),
        _rollouts(open_, ["\\boxed{x+1}", "\\boxed{1+x}", "\\boxed{7}", "\\boxed{x + 1}"]),
        _rollouts(bad, ["\\boxed{1}"]),
        [],
        _rollouts(unsure, ["\\boxed{1}", "\\boxed{2}"]),
    ]
    refs = {"o": Reference("1 + x", 0.75), "u": Reference(None, 0.25)}
    got = measure([gold, open_, bad, empty, unsure], groups, scorer, refs)
    assert got[0] == (0.25, 4, "ground_truth", None, None, None)  # correct, incorrect, no_answer, incorrect
    assert got[1] == (0.75, 4, "reference", "1 + x", None, 0.75)  # x+1, 1+x, x + 1 equal the reference
    assert got[2] == (None, 1, "ground_truth", None, "bad_gold", None)
    assert got[3] == (None, 0, "ground_truth", None, "no_samples", None)
    assert got[4] == (None, 2, "reference", None, "ambiguous", 0.25)
    assert measure([open_], groups[1:2], scorer)[0].reason == "no_reference"  # never measured against itself


def test_a_problem_whose_answers_all_disagree_is_ambiguous_not_teachable(scorer):
    """The old rule measured agreement with the same model's plurality: eight different answers gave
    1/8, inside the default band [0.1, 0.6], and the problem was kept. A reference model that cannot
    agree with itself makes it "too hard or ambiguous"."""
    from distill.select import plurality_answers

    p = Problem(id="q", prompt="Name a prime.")
    scattered = _rollouts(p, [f"\\boxed{{{k}}}" for k in (2, 3, 5, 7, 11, 13, 17, 19)])
    clear = _rollouts(p, ["\\boxed{2}"] * 5 + ["\\boxed{3}"] * 3)
    assert plurality_answers([scattered, clear], 0.5, scorer) == [(None, 1 / 8), ("2", 5 / 8)]


# ---------------------------------------------------------------- end to end

class ScriptedServer:
    """An OpenAI-compatible chat endpoint answering each prompt from a script, at most 3 choices a request.

    `models` gives some served model names scripts of their own; every other name gets `script`.
    """

    def __init__(self, script: dict[str, list[str]], models: dict[str, dict[str, list[str]]] | None = None):
        self.scripts = {None: script, **(models or {})}
        self.served = {(m, p): 0 for m, sc in self.scripts.items() for p in sc}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, model: str, prompt: str, n: int) -> list[str]:
        key = (model if model in self.scripts else None, prompt)
        with self.lock:
            start = self.served[key]
            self.served[key] = start + min(n, 3)
        return self.scripts[key[0]][prompt][start:start + min(n, 3)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answers = server._take(body["model"], body["messages"][-1]["content"], body["n"])
                choices = [{"index": i, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"The answer is \\boxed{{{a}}}.",
                                        "reasoning_content": "Work it out."}} for i, a in enumerate(answers)]
                data = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


# Four gold problems with 0, 2, 4 and 8 correct answers of 8, and one without a gold answer,
# for which a stronger model ("strong") gives the reference: 1/2 in 6 of its 8 answers.
SCRIPT = {
    "What is 1 + 1?": ["3"] * 8,
    "What is 2 + 2?": ["4", "5", "4", "6", "7", "8", "9", "10"],
    "What is 3 + 3?": ["6", "6", "6", "6", "1", "2", "3", "4"],
    "What is 4 + 4?": ["8"] * 8,
    "Give one half.": ["\\frac{1}{2}", "0.5", "1/2", "3", "1/2", "2", "0.5", "1"],
}
STRONG = {"Give one half.": ["1/2", "0.5", "\\frac{1}{2}", "1/2", "2", "0.5", "1/2", "3"]}
GOLD = {"What is 1 + 1?": "2", "What is 2 + 2?": "4", "What is 3 + 3?": "6", "What is 4 + 4?": "8"}
RATES = {"What is 1 + 1?": 0.0, "What is 2 + 2?": 0.25, "What is 3 + 3?": 0.5, "What is 4 + 4?": 1.0,
         "Give one half.": 5 / 8}


def scripted_problems() -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=prompt, ground_truth=GOLD.get(prompt)) for i, prompt in enumerate(SCRIPT)]


@pytest.fixture
def server():
    s = ScriptedServer(SCRIPT, {"strong": STRONG})
    yield s
    s.close()


def test_select_through_an_endpoint_gives_exact_rates_band_and_histogram(server):
    cfg = SelectConfig(engine="openai", model="ref", base_url=server.url, api_key_env=None, n=8, bins=4,
                       verify=VerifyOptions(workers=1), reference={"model": "strong"})
    kept, dropped, report = select_teachable(scripted_problems(), cfg)
    rates = {p.prompt: p.metadata["pass_rate"] for p in kept + [d.record for d in dropped]}
    assert rates == RATES
    assert [p.prompt for p in kept] == ["What is 2 + 2?", "What is 3 + 3?"]
    assert {d.record.prompt: d.reason for d in dropped} == {"What is 1 + 1?": "too_hard", "What is 4 + 4?": "too_easy",
                                                            "Give one half.": "too_easy"}
    half = next(d.record for d in dropped if d.record.id == "p4")
    assert half.metadata["select"] == {"samples": 8, "against": "reference", "model": "ref",
                                       "reference_answer": "1/2", "reference_model": "strong",
                                       "reference_agreement": 6 / 8}
    assert report.details["histogram"] == [1, 1, 2, 1]  # 0 | .25 | .5 .625 | 1
    assert report.details["histogram_kept"] == [0, 1, 1, 0]
    assert report.details["against"] == {"ground_truth": 4, "reference": 1}
    assert (report.seen, report.kept, report.dropped) == (5, 2, {"too_hard": 1, "too_easy": 2})
    assert set(server.served.values()) == {8}  # 3 + 3 + 2 choices: the short replies were asked again
    assert server.served[("strong", "Give one half.")] == 8 and server.served[(None, "Give one half.")] == 8


def test_reference_answers_from_a_file(server, tmp_path):
    from reason.records import write_jsonl

    write_jsonl(tmp_path / "ref.jsonl", [{"id": "p4", "answer": "0.5"}])
    cfg = SelectConfig(engine="openai", model="ref", base_url=server.url, api_key_env=None, n=8,
                       verify=VerifyOptions(workers=1), reference={"answers": str(tmp_path / "ref.jsonl")})
    kept, dropped, _ = select_teachable(scripted_problems(), cfg)
    half = next(p for p in kept + [d.record for d in dropped] if p.id == "p4")
    assert half.metadata["pass_rate"] == 5 / 8 and half.metadata["select"]["reference_answer"] == "0.5"
    no_ref = SelectConfig(engine="openai", model="ref", base_url=server.url, api_key_env=None, n=8,
                          verify=VerifyOptions(workers=1))
    server.served = dict.fromkeys(server.served, 0)
    _, dropped, _ = select_teachable(scripted_problems(), no_ref)
    assert {d.record.id: d.reason for d in dropped}["p4"] == "no_reference"


@pytest.mark.slow
def test_select_with_hf_engine_on_a_tiny_model(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    problems = scripted_problems()
    cfg = SelectConfig(engine="hf", model=str(model), n=4, max_tokens=8, dtype="float32", batch=2,
                       chat={"system_prompt": None}, verify=VerifyOptions(workers=1))
    kept, dropped, report = select_teachable(problems, cfg)
    assert len(kept) + len(dropped) == len(problems) == report.seen
    every = {p.id: p for p in kept + [d.record for d in dropped]}
    for p in problems:
        meta = every[p.id].metadata
        assert meta["select"]["samples"] == 4
        assert meta["select"]["against"] == ("ground_truth" if p.ground_truth else "reference")
        if p.ground_truth:
            assert meta["pass_rate"] * 4 == int(meta["pass_rate"] * 4)  # a share of 4 samples
    for d in dropped:
        if "pass_rate" in d.record.metadata:
            assert d.reason == band_verdict(d.record.metadata["pass_rate"], cfg.band)[0]
    for p in kept:
        assert band_verdict(p.metadata["pass_rate"], cfg.band) is None
    assert sum(report.details["histogram"]) == len(problems) - 1  # the one without gold or reference
    again = select_teachable(problems, cfg)  # same seed, same samples, same rates
    assert [p.metadata for p in again.kept + [d.record for d in again.dropped]] == \
        [p.metadata for p in kept + [d.record for d in dropped]]
