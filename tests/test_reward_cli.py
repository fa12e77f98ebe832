"""`reason reward score`: end to end through the real CLI, and bad input."""
import json
import subprocess
import sys

import pytest

GOOD = "<think>\nadd\n</think>\n\n\\boxed{4}"


def run(*args):
    return subprocess.run([sys.executable, "-m", "reason.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_score_file(tmp_path):
    rows = [
        {"id": "a", "completion": GOOD, "ground_truth": "4", "num_tokens": 10, "finish_reason": "stop", "source": "s1"},
        {"id": "b", "completion": GOOD, "ground_truth": 5, "num_tokens": 10, "finish_reason": "stop", "source": "s1"},
        {"id": "c", "completion": GOOD, "ground_truth": "", "num_tokens": 10, "source": "s2"},
        {"id": "d", "completion": GOOD, "ground_truth": "4", "num_tokens": 99, "finish_reason": "length", "source": "s2"},
    ]
    src = write_lines(tmp_path / "in.jsonl", rows)
    out, summ = tmp_path / "scores.jsonl", tmp_path / "summary.json"
    r = run("reward", "score", src, "--out", out, "--summary", summ, "--set", "workers=2")
    assert r.returncode == 0, r.stderr
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == ["a", "b", "c", "d"]
    assert [s["status"] for s in scored] == ["ok", "ok", "skipped", "ok"]
    assert scored[0]["score"] == pytest.approx(8 / 13) and scored[1]["score"] == pytest.approx(-8 / 13, abs=1e-4)
    assert scored[3]["components"]["truncated"] == 1.0
    s = json.loads(summ.read_text())
    assert (s["n"], s["scored"], s["skipped"], s["timeouts"]) == (4, 3, 1, 0)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["by_source"]["s2"]["skipped"] == 1
    assert "reward summary" in r.stderr


def test_named_rewards_with_weights(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"completion": GOOD, "ground_truth": "4"}])
    out = tmp_path / "o.jsonl"
    r = run("reward", "score", src, "-o", out, "-r", "accuracy=2", "-r", "rewards.builtin:think_format=0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["score"] == pytest.approx(2.5)


@pytest.mark.parametrize("bad, needle", [
    ('{"completion": "x", "ground_truth": "1"', "not valid JSON"),
    ('{"ground_truth": "1"}', "field 'completion'"),
    ('{"completion": 3, "ground_truth": "1"}', "field 'completion'"),
    ('{"completion": "x", "num_tokens": "ten"}', "field 'num_tokens'"),
    ('{"completion": "x", "finish_reason": "eos"}', "field 'finish_reason'"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, bad, needle):
    src = write_lines(tmp_path / "in.jsonl", [{"completion": GOOD, "ground_truth": "4", "num_tokens": 3}, bad])
    out = tmp_path / "o.jsonl"
    r = run("reward", "score", src, "-o", out, "-r", "phi4_plus")
    assert r.returncode == 2
    assert f"{src}:2" in r.stderr.replace("\n", "") and needle in r.stderr.replace("\n", "")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_unknown_reward_and_missing_tokens(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"completion": GOOD, "ground_truth": "4"}])
    r = run("reward", "score", src, "-o", tmp_path / "o.jsonl", "-r", "nope")
    assert r.returncode == 2 and "unknown reward 'nope'" in r.stderr
    r = run("reward", "score", src, "-o", tmp_path / "o.jsonl", "-r", "phi4_plus")
    assert r.returncode == 2 and "num_tokens" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()
