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


def test_measure_against_gold_plurality_bad_gold_and_no_samples():
    gold = Problem(id="g", prompt="2 + 3?", ground_truth="5")
    open_ = Problem(id="o", prompt="Simplify 1 + x.")
    bad = Problem(id="b", prompt="?", ground_truth="???")
    empty = Problem(id="e", prompt="4 + 4?", ground_truth="8")
    groups = [
        _rollouts(gold, ["\\boxed{5}", "\\boxed{4}", "no idea", "<think>\\boxed{5}</think> so \\boxed{6}"]),
        _rollouts(open_, ["\\boxed{x+1}", "\\boxed{1+x}", "\\boxed{7}", "\\boxed{x + 1}"]),
        _rollouts(bad, ["\\boxed{1}"]),
        [],
    ]
    with verify_scorer(VerifyOptions(workers=1), ChatConfig()) as scorer:
        got = measure([gold, open_, bad, empty], groups, scorer)
    assert got[0] == (0.25, 4, "ground_truth", None, None)  # correct, incorrect, no_answer, incorrect
    assert got[1] == (0.75, 4, "plurality", "x+1", None)  # 1+x merged into x+1 by math-verify; 7 is not
    assert got[2] == (None, 1, "ground_truth", None, "bad_gold")
    assert got[3] == (None, 0, "ground_truth", None, "no_samples")


# ---------------------------------------------------------------- end to end

class ScriptedServer:
    """An OpenAI-compatible chat endpoint answering each prompt from a script, at most 3 choices a request."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.served = script, {p: 0 for p in script}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, prompt: str, n: int) -> list[str]:
        with self.lock:
            start = self.served[prompt]
            self.served[prompt] = start + min(n, 3)
        return self.script[prompt][start:start + min(n, 3)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answers = server._take(body["messages"][-1]["content"], body["n"])
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


# Four gold problems with 0, 2, 4 and 8 correct answers of 8, and one without a gold answer.
SCRIPT = {
    "What is 1 + 1?": ["3"] * 8,
    "What is 2 + 2?": ["4", "5", "4", "6", "7", "8", "9", "10"],
    "What is 3 + 3?": ["6", "6", "6", "6", "1", "2", "3", "4"],
    "What is 4 + 4?": ["8"] * 8,
    "Give one half.": ["\\frac{1}{2}", "0.5", "1/2", "3", "1/2", "2", "0.5", "1"],
}
GOLD = {"What is 1 + 1?": "2", "What is 2 + 2?": "4", "What is 3 + 3?": "6", "What is 4 + 4?": "8"}
RATES = {"What is 1 + 1?": 0.0, "What is 2 + 2?": 0.25, "What is 3 + 3?": 0.5, "What is 4 + 4?": 1.0,
         "Give one half.": 5 / 8}


def scripted_problems() -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=prompt, ground_truth=GOLD.get(prompt)) for i, prompt in enumerate(SCRIPT)]


@pytest.fixture
def server():
    s = ScriptedServer(SCRIPT)
    yield s
    s.close()


def test_select_through_an_endpoint_gives_exact_rates_band_and_histogram(server):
    cfg = SelectConfig(engine="openai", model="ref", base_url=server.url, api_key_env=None, n=8, bins=4,
                       verify=VerifyOptions(workers=1))
    kept, dropped, report = select_teachable(scripted_problems(), cfg)
    rates = {p.prompt: p.metadata["pass_rate"] for p in kept + [d.record for d in dropped]}
    assert rates == RATES
    assert [p.prompt for p in kept] == ["What is 2 + 2?", "What is 3 + 3?"]
    assert {d.record.prompt: d.reason for d in dropped} == {"What is 1 + 1?": "too_hard", "What is 4 + 4?": "too_easy",
                                                            "Give one half.": "too_easy"}
    half = next(d.record for d in dropped if d.record.id == "p4")
    assert half.metadata["select"] == {"samples": 8, "against": "plurality", "model": "ref",
                                       "plurality_answer": "\\frac{1}{2}"}
    assert report.details["histogram"] == [1, 1, 2, 1]  # 0 | .25 | .5 .625 | 1
    assert report.details["histogram_kept"] == [0, 1, 1, 0]
    assert report.details["against"] == {"ground_truth": 4, "plurality": 1}
    assert (report.seen, report.kept, report.dropped) == (5, 2, {"too_hard": 1, "too_easy": 2})
    assert set(server.served.values()) == {8}  # 3 + 3 + 2 choices: the short replies were asked again


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
        assert meta["select"]["against"] == ("ground_truth" if p.ground_truth else "plurality")
        assert meta["pass_rate"] * 4 == int(meta["pass_rate"] * 4)  # a share of 4 samples
    for d in dropped:
        assert d.reason == band_verdict(d.record.metadata["pass_rate"], cfg.band)[0]
    for p in kept:
        assert band_verdict(p.metadata["pass_rate"], cfg.band) is None
    assert sum(report.details["histogram"]) == len(problems)
    again = select_teachable(problems, cfg)  # same seed, same samples, same rates
    assert [p.metadata for p in again.kept + [d.record for d in again.dropped]] == \
        [p.metadata for p in kept + [d.record for d in dropped]]
