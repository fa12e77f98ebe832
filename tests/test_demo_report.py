"""The demo report's figures from eval rows: per-stage pass@1 with its interval, the paired
difference on shared problems, lengths of correct and wrong answers, accuracy by
difficulty."""
from __future__ import annotations

from reason.demo_report import paired_difference, per_problem, stage_stats
from reason.passk import bootstrap_ci
from reason.synthetic import generate_problems


def rows(ids: list[str], correct: list[list[bool | None]], tokens: int = 10, text: str = "") -> list[dict]:
    return [{"id": pid, "correct": c, "num_tokens": tokens + 5 * bool(c), "completion": text}
            for pid, cs in zip(ids, correct) for c in cs]


def test_paired_interval_is_narrower_than_the_stages_own_and_excludes_zero():
    """300 problems: 150 both stages get right, 120 both get wrong, 30 only the second gets
    right (+10 points). Each stage's own interval is ~±5.5 points; the paired one, which
    removes what the stages share, is ~±3.3 and excludes 0."""
    ids = [f"p{i}" for i in range(300)]
    before = rows(ids, [[True, True]] * 150 + [[False, False]] * 150)
    after = rows(ids, [[True, True]] * 180 + [[False, False]] * 120)
    d = paired_difference(after, before)
    assert abs(d["diff"] - 0.10) < 1e-9 and d["n_problems"] == 300
    lo, hi = d["ci"]
    assert 0 < lo < 0.10 < hi
    own = bootstrap_ci(list(per_problem(after).values()))
    assert hi - lo < 0.7 * (own[1] - own[0])


def test_paired_difference_uses_only_problems_both_stages_scored():
    after = rows(["a", "b", "c"], [[True], [True], [False]])
    before = rows(["a", "b"], [[False], [True]])  # base evaluated on a prefix
    d = paired_difference(after, before)
    assert d["n_problems"] == 2 and d["diff"] == 0.5


def test_stage_stats_lengths_difficulty_and_unjudged_samples():
    problems = generate_problems(40, seed=3, levels=(0,))
    ids = [p.id for p in problems]
    verdicts = [[True, False] if i % 2 else [True, None] for i in range(40)]  # None: no verdict, not counted
    r = rows(ids, verdicts, text="Add column by column ...")
    summary = {"overall": {"pass@1": 0.0, "pass@2": 0.5, "format_violation_rate": 0.25, "truncation_rate": 0.0}}
    s = stage_stats(r, summary, {p.id: p for p in problems})
    assert s["n_problems"] == 40 and s["n_samples"] == 60
    assert abs(s["pass1"] - (20 * 1.0 + 20 * 0.5) / 40) < 1e-9
    assert s["ci"][0] < s["pass1"] < s["ci"][1]
    assert s["mean_tokens_correct"] == 15 and s["mean_tokens_wrong"] == 10
    assert s["worked"] == 1.0 and s["format_ok"] == 0.75
    assert s["pass_at_k"] == {"pass@1": 0.0, "pass@2": 0.5}
    assert set(s["by_difficulty"]) <= {"0", "1", "2"} and len(s["by_difficulty"]) >= 2


def test_preference_lines_only_when_the_pts_stage_ran(tmp_path):
    import json

    from reason.demo_report import _preference_findings, pts_figures

    assert _preference_findings({}) == []  # the default demo: no PTS, no DPO line
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"problems": 40, "done_before": 0, "searched": 21, "skipped": {"too_easy": 12,
                      "too_hard": 7}, "pivots": 30, "pairs": 28, "unpaired": 2, "estimates": 300,
                      "completions": 1200, "scan_estimates": 2500, "delta_bins": 10, "delta_histogram": []}) + "\n")
    summary = {"pts": pts_figures(report), "dpo_minus_sft": {"diff": -0.012, "ci": [-0.03, 0.006], "n_problems": 500}}
    pts, dpo = _preference_findings(summary)
    assert "21 of 40" in pts and "too_easy 12, too_hard 7" in pts and "30 pivotal tokens, 28 pairs" in pts
    assert "DPO - SFT: **-1.2 points** [-3.0, +0.6]" in dpo and "500 problems" in dpo
