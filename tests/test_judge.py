"""Judge-guided pairs (distill/judge.py): verdicts read leniently and never guessed, both orders asked,
a faulty judge server (500s, 429s, dropped connections, hangs) and a real vLLM server as judge."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.judge import JudgeConfig, Judgement, decide, judge_messages, judge_pairs, parse_verdict
from distill.pairs import PreferencePair
from reason.chat import ChatConfig
from reason.config import ConfigError, load_config
from reason.records import Problem, Trace, read_jsonl, write_jsonl
from tests.test_distill_generate import Teacher
from tests.test_distill_vllm import SERVED_NAME, server, tiny_dir  # noqa: F401  (server and its model: fixtures)

CHAT = ChatConfig()
MODES = ("consistent", "position", "tie", "unreadable")  # how the scripted judge answers prompt i (i % 4)


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"Question {i}: what is {i} + {i}?", ground_truth=str(2 * i)) for i in range(n)]


def _traces(path: Path, problems: list[Problem], who: str) -> Path:
    # The policy's answer is "better" on even prompts, the reference's on odd ones.
    rows = []
    for i, p in enumerate(problems):
        better = (who == "policy") == (i % 2 == 0)
        rows.append(Trace(problem=p, reasoning=f"{who} thinks about {{it}}", teacher=who,
                          answer=f"{'better' if better else 'worse'} answer by {who}: \\boxed{{{2 * i}}}"))
    write_jsonl(path, rows)
    return path


def scripted_judge(body: dict, i: int) -> dict:
    """Answers by what the prompt holds: a consistent judge, a position-biased one, a tie, or no verdict."""
    text = body["messages"][-1]["content"]
    mode = MODES[int(re.search(r"Question (\d+):", text).group(1)) % 4]
    first = text.split("[Response A]")[1].split("[Response B]")[0]
    verdict = {"consistent": "A" if "better answer" in first else "B", "position": "A", "tie": "tie"}.get(mode)
    words = f"I compared them. **Verdict:** {verdict}" if verdict else "Both have merits; I cannot choose."
    return {"index": i, "message": {"role": "assistant", "content": words}, "finish_reason": "stop"}


def _cfg(url: str, **kw) -> JudgeConfig:
    base = dict(base_url=url, model="judge-x", concurrency=3, retries=20, timeout=0.5, backoff=0.01,
                max_backoff=0.05)
    return JudgeConfig(**{**base, **kw})


@pytest.fixture
def inputs(tmp_path) -> tuple[list[Problem], Path, Path]:
    problems = _problems(12)
    return problems, _traces(tmp_path / "policy.jsonl", problems, "policy"), \
        _traces(tmp_path / "reference.jsonl", problems, "reference")


# ---------------------------------------------------------------- pure parts

def test_verdicts_are_read_leniently_and_never_guessed():
    assert parse_verdict("Long reasons.\nVerdict: B") == "B"
    assert parse_verdict("The better response is A.") == "A"
    assert parse_verdict("Winner: Response B") == "B"
    assert parse_verdict('```json\n{"verdict": "A", "reason": "clearer"}\n```') == "A"
    assert parse_verdict("My final verdict is [[B]].") == "B"
    assert parse_verdict("VERDICT: TIE") == "tie"
    assert parse_verdict("A") == "A" and parse_verdict("**B**") == "B"
    for unreadable in ("", "Both are fine.", "Verdict: A. On reflection, verdict: B.", "verdict: a draw",
                       "I prefer response C", "Verdict: AB"):
        assert parse_verdict(unreadable) is None, unreadable
    assert [decide(a, b) for a, b in (("reference", "reference"), ("tie", "policy"), (None, None))] == [
        "kept", "disagree", "error"]


def test_the_template_is_checked_and_responses_stay_data():
    with pytest.raises(ConfigError, match="template"):
        load_config(JudgeConfig, None, ["template=Compare {first} and {second}"])  # no {question}
    with pytest.raises(ConfigError, match="template"):
        load_config(JudgeConfig, None, ["template={question} {first} {second} {extra}"])
    cfg = JudgeConfig(model="j", system_prompt="Be fair.", answer_only=True)
    msgs = judge_messages(_problems(1)[0], "<think>\nsecret\n</think>\n\n\\boxed{x}", "{second}", cfg)
    assert msgs[0] == {"role": "system", "content": "Be fair."}
    user = msgs[1]["content"]
    assert "secret" not in user and "\\boxed{x}" in user and "[Response B]\n{second}" in user
    assert "accuracy" in user and "Question 0" in user


# ---------------------------------------------------------------- a faulty judge server

def test_faulty_judge_every_prompt_ends_once_as_kept_disagree_tie_or_error(tmp_path, inputs):
    problems, policy, reference = inputs
    judge = Teacher({"500": 0.15, "429": 0.15, "drop": 0.15, "hang": 0.05}, seed=4, answer=scripted_judge)
    try:
        report = judge_pairs(policy, reference, tmp_path / "pairs.jsonl", _cfg(judge.url))
    finally:
        judge.close()
    assert all(judge.seen[k] > 0 for k in ("500", "429", "drop", "hang", "ok")), judge.seen
    assert judge.max_in_flight <= 3
    log = list(read_jsonl(tmp_path / "pairs.log.jsonl", Judgement))
    assert sorted(j.problem_id for j in log) == sorted(p.id for p in problems)  # each once
    want = {"consistent": "kept", "position": "disagree", "tie": "tie", "unreadable": "error"}
    assert {j.problem_id: j.status for j in log} == {p.id: want[MODES[i % 4]] for i, p in enumerate(problems)}
    assert report.outcomes == {"kept": 3, "disagree": 3, "tie": 3, "error": 3} and report.errors == {"no verdict": 6}
    for j in log:
        assert [v.order for v in j.verdicts] == ["policy_first", "reference_first"]
        assert all(v.text for v in j.verdicts) and all(v.error is None for v in j.verdicts)
    pairs = list(read_jsonl(tmp_path / "pairs.jsonl", PreferencePair))
    assert [p.problem.id for p in pairs] == ["p0", "p4", "p8"]  # in prompt order
    for p in pairs:  # the policy's answer is the better one on even prompts
        assert p.chosen.startswith("<think>\npolicy") and "better answer" in p.chosen and "worse" in p.rejected
        assert p.metadata["winner"] == "policy" and len(p.metadata["verdicts"]) == 2
    assert report.policy_won == 3


def test_failed_requests_are_recorded_once_and_retried_only_when_asked(tmp_path, inputs):
    problems, policy, reference = inputs
    out = tmp_path / "pairs.jsonl"
    down = Teacher(status=503)
    try:
        report = judge_pairs(policy, reference, out, _cfg(down.url, retries=1))
    finally:
        down.close()
    assert report.outcomes == {"error": 12} and report.errors == {"http 503": 24}
    assert down.seen["status"] == 12 * 2 * 2  # two orders, two attempts each
    up = Teacher(answer=scripted_judge)
    try:
        again = judge_pairs(policy, reference, out, _cfg(up.url))
        assert (again.done_before, sum(up.seen.values())) == (12, 0)  # recorded: not asked again
        retried = judge_pairs(policy, reference, out, _cfg(up.url, retry_errors=True))
    finally:
        up.close()
    assert retried.done_before == 0 and retried.outcomes == {"kept": 3, "disagree": 3, "tie": 3, "error": 3}
    assert len(read_jsonl_list(tmp_path / "pairs.log.jsonl")) == 24  # the retried lines replace the first
    assert len(list(read_jsonl(out, PreferencePair))) == 3


def read_jsonl_list(path: Path) -> list:
    return list(read_jsonl(path, Judgement))


def test_resume_asks_only_for_the_prompts_the_log_lacks(tmp_path, inputs):
    problems, policy, reference = inputs
    out, log = tmp_path / "pairs.jsonl", tmp_path / "pairs.log.jsonl"
    judge = Teacher(answer=scripted_judge)
    try:
        whole = judge_pairs(policy, reference, tmp_path / "whole.jsonl", _cfg(judge.url))
        lines = (tmp_path / "whole.log.jsonl").read_text().splitlines()
        log.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])  # five judged, the sixth torn by a kill
        asked = sum(judge.seen.values())
        report = judge_pairs(policy, reference, out, _cfg(judge.url))
        assert sum(judge.seen.values()) - asked == 7 * 2
    finally:
        judge.close()
    assert report.done_before == 5 and report.outcomes == whole.outcomes
    assert Counter(j.problem_id for j in read_jsonl(log, Judgement)) == {p.id: 1 for p in problems}
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_a_missing_reference_response_names_file_and_line(tmp_path, inputs):
    problems, policy, _ = inputs
    reference = _traces(tmp_path / "partial.jsonl", [p for p in problems if p.id != "p3"], "reference")
    r = CliRunner().invoke(app, ["judge-pairs", "--policy", str(policy), "--reference", str(reference),
                                 "-o", str(tmp_path / "pairs.jsonl"), "--set", "model=j"])
    assert r.exit_code == 2, r.output
    assert f"{policy}:4: problem 'p3' has no reference response in {reference}" in " ".join(r.output.split())
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "pairs.log.jsonl").exists()
    problems_only = tmp_path / "problems.jsonl"
    write_jsonl(problems_only, problems)
    r = CliRunner().invoke(app, ["judge-pairs", "--policy", str(problems_only), "--reference", str(reference),
                                 "-o", str(tmp_path / "pairs.jsonl"), "--set", "model=j"])
    assert r.exit_code == 2 and f"{problems_only}:1: --policy: expected traces or rollouts" in r.output


def test_cli_prints_the_report(tmp_path, inputs):
    _, policy, reference = inputs
    judge = Teacher(answer=scripted_judge)
    try:
        r = CliRunner().invoke(app, ["judge-pairs", "--policy", str(policy), "--reference", str(reference),
                                     "-o", str(tmp_path / "pairs.jsonl"), "--set", f"base_url={judge.url}",
                                     "--set", "model=judge-x"])
    finally:
        judge.close()
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["outcomes"] == {"kept": 3, "disagree": 3, "tie": 3, "error": 3} and report["prompts"] == 12


# ---------------------------------------------------------------- a real vLLM server as the judge

# A random tiny model writes no verdicts of its own: vLLM's structured outputs give its words the shape of
# one, with "none" as a verdict that cannot be read. Everything else (chat template, HTTP, sampling) is real.
VERDICT_REGEX = r"[a-z ]{3,30}\. Verdict: (A|B|tie|none)"


@pytest.mark.slow
def test_a_real_vllm_server_as_the_judge(server, tmp_path, inputs):
    from distill.judge import winner

    problems, policy, reference = inputs
    cfg = JudgeConfig(base_url=server, model=SERVED_NAME, temperature=1.0, max_tokens=64, retries=3, timeout=120,
                      concurrency=4, extra_body={"structured_outputs": {"regex": VERDICT_REGEX}})
    report = judge_pairs(policy, reference, tmp_path / "pairs.jsonl", cfg)
    log = list(read_jsonl(tmp_path / "pairs.log.jsonl", Judgement))
    assert sorted(j.problem_id for j in log) == sorted(p.id for p in problems)
    assert sum(report.outcomes.values()) == 12 and set(report.outcomes) <= {"kept", "disagree", "tie", "error"}
    for j in log:
        for v in j.verdicts:
            assert v.error is None and re.fullmatch(VERDICT_REGEX, v.text), v.text
            assert v.winner == winner(parse_verdict(v.text), v.order)
            assert (v.winner is None) == v.text.endswith("none")
        assert j.status == decide(j.verdicts[0].winner, j.verdicts[1].winner)
    kept = [j.problem_id for j in log if j.status == "kept"]
    assert sorted(p.problem.id for p in read_jsonl(tmp_path / "pairs.jsonl", PreferencePair)) == sorted(kept)
    print(f"real judge: {report.outcomes}")
