"""Problem loading (JSONL / Parquet / saved HF dataset) and the synthetic problems and teacher."""
from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.synthetic import synthetic_trace
from reason.problems import load_problems
from reason.records import RecordError
from reason.synthetic import KINDS, LEVELS, generate_problems

ROWS = [
    {"question": "What is 6 times 7?", "answer": "42", "idx": 3, "level": "easy"},
    {"problem": "Halve one.", "solution": "Half of 1 is \\boxed{\\frac{1}{2}}."},
    {"messages": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}],
     "final_answer": 4},
    {"input": "GSM style", "target": "Work: 3 + 4 = 7\n#### 1,007"},
]


def write_jsonl(path, rows, blank_lines=()):
    lines = [json.dumps(r) for r in rows]
    for i in blank_lines:
        lines.insert(i, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def check_common_rows(problems):
    a, b, c, d = problems
    assert (a.id, a.prompt, a.ground_truth, a.metadata) == ("3", "What is 6 times 7?", "42", {"level": "easy"})
    assert b.prompt == "Halve one." and b.ground_truth == "\\frac{1}{2}"
    assert b.id.startswith("h") and len(b.id) == 17
    assert c.prompt == [{"role": "user", "content": "Add 2 and 2."}] and c.ground_truth == "4"
    assert d.ground_truth == "1007"


def test_jsonl_maps_common_field_names(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", ROWS)
    problems = load_problems(path)
    check_common_rows(problems)
    assert {p.source for p in problems} == {"mix"}
    assert load_problems(path, source="gsm")[0].source == "gsm"
    again = load_problems(path)
    assert [p.id for p in again] == [p.id for p in problems]  # hash ids are stable


def test_jsonl_custom_fields_and_nested_columns(tmp_path):
    rows = [{"query": "Q1", "reward_model": {"ground_truth": "5"}, "uid": "u1", "data_source": "aime"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    p, = load_problems(path, fields={"prompt": "query", "id": "uid"})
    assert (p.id, p.prompt, p.ground_truth, p.source) == ("u1", "Q1", "5", "aime")
    p, = load_problems(path, fields={"prompt": "query", "ground_truth": "reward_model.ground_truth"})
    assert p.ground_truth == "5"
    with pytest.raises(ValueError, match="unknown keys in fields"):
        load_problems(path, fields={"question": "query"})


def test_missing_prompt_names_file_line_and_tried_fields(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"text": "no prompt here", "answer": "1"}],
                       blank_lines=[1])
    with pytest.raises(RecordError) as e:
        load_problems(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3:")  # the blank line 2 is counted
    assert "no prompt field" in msg and "problem, question, prompt, input, messages" in msg and "text" in msg


def test_missing_answer_is_an_error_unless_not_required(tmp_path):
    path = write_jsonl(tmp_path / "noans.jsonl", [{"question": "Q"}])
    with pytest.raises(RecordError, match=r"noans.jsonl:1: no answer field: tried answer, ground_truth"):
        load_problems(path)
    assert load_problems(path, require_answer=False)[0].ground_truth is None
    broken = write_jsonl(tmp_path / "box.jsonl", [{"question": "Q", "solution": "so \\boxed{12"}])
    with pytest.raises(RecordError, match=r"box.jsonl:1: field 'solution'"):
        load_problems(broken)


def test_malformed_jsonl_is_a_record_error(tmp_path):
    path = tmp_path / "torn.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{\"question\": \n")
    with pytest.raises(RecordError, match=r"torn.jsonl:2: not valid JSON"):
        load_problems(path)
    other = tmp_path / "notes.txt"
    other.write_text("question: Q\n")
    with pytest.raises(RecordError, match="unknown format"):
        load_problems(other)
    with pytest.raises(RecordError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    rows = [r for r in ROWS if "messages" not in r]
    columns = {k for r in rows for k in r}
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), path)  # nulls
    a, b, d = load_problems(path)
    assert (a.id, a.ground_truth, b.ground_truth, d.ground_truth) == ("3", "42", "\\frac{1}{2}", "1007")
    assert a.metadata == {"level": "easy"} and a.source == "p"
    pq.write_table(pa.Table.from_pylist([{"question": "Q", "answer": "1"}, {"question": None, "answer": "2"}]),
                   path)
    with pytest.raises(RecordError, match=r"p.parquet: row 1: no prompt field: tried problem, question"):
        load_problems(path)


def save_dataset_dir(folder, rows, shards=2):
    """What `datasets.Dataset.save_to_disk` writes: Arrow stream shards + state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per = -(-len(rows) // shards)
    for i, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.slice(i * per, per))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_saved_hf_dataset_directory(tmp_path):
    rows = [{"problem": f"P{i}", "answer": str(i), "unique_id": f"u{i}"} for i in range(5)]
    save_dataset_dir(tmp_path / "ds" / "train", rows)
    problems = load_problems(tmp_path / "ds" / "train", source="math")
    assert [p.id for p in problems] == [f"u{i}" for i in range(5)]  # shard order kept
    assert problems[4].ground_truth == "4" and problems[0].source == "math"
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(RecordError, match="DatasetDict with splits"):
        load_problems(tmp_path / "ds")
    save_dataset_dir(tmp_path / "bad", [{"problem": "P", "answer": "1"}, {"problem": "Q", "answer": None}])
    with pytest.raises(RecordError, match=r"bad: row 1: no answer field"):
        load_problems(tmp_path / "bad")


# ---------------------------------------------------------------- synthetic problems

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact(expr: str, x: Fraction | None = None) -> Fraction:
    """Evaluate + - * / ( ) over integers (and the name x) exactly, without eval()."""
    def go(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](go(node.left), go(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -go(node.operand)
        if isinstance(node, ast.Name) and node.id == "x":
            return x
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return Fraction(node.value)
    return go(ast.parse(expr, mode="eval").body)


def recompute(prompt: str) -> Fraction:
    """The answer worked out again from the prompt text alone."""
    nums = [int(n) for n in re.findall(r"\d+", prompt)]
    if m := re.fullmatch(r"What is (.+)\?", prompt):
        return exact(m[1])
    if m := re.fullmatch(r"Evaluate (.+)\.", prompt):
        return exact(m[1])
    if m := re.fullmatch(r"Solve for x: (.+) = (.+)\.", prompt):
        side = [re.sub(r"(\d)x", r"\1*x", s) for s in m.groups()]
        f = [exact(side[0], Fraction(v)) - exact(side[1], Fraction(v)) for v in (0, 1)]  # f(x) = f0 + (f1-f0) x
        return -f[0] / (f[1] - f[0])
    if m := re.match(r"Compute (\d+)/(\d+) (\S) (\d+)/(\d+)\.", prompt):
        a, b = Fraction(int(m[1]), int(m[2])), Fraction(int(m[4]), int(m[5]))
        return {"+": a + b, "-": a - b, "*": a * b, "÷": a / b}[m[3]]
    if "boxes of" in prompt:
        return Fraction(nums[0] * nums[1])
    if "dollars" in prompt:
        return Fraction(nums[0] - nums[1] * nums[2])
    if "baker" in prompt:
        return Fraction(nums[0] * nums[1] - nums[2])
    if "pages" in prompt:
        return Fraction(nums[0] * nums[1] + nums[2])
    if "friends" in prompt:
        return Fraction(nums[0] * nums[1], nums[2])
    raise AssertionError(f"unrecognised prompt: {prompt}")


def test_generator_is_deterministic_and_seeds_differ():
    a, b = generate_problems(60, seed=7), generate_problems(60, seed=7)
    assert [p.model_dump() for p in a] == [p.model_dump() for p in b]
    assert [p.id for p in generate_problems(20, seed=7)] == [p.id for p in a[:20]]
    other = {p.prompt for p in generate_problems(60, seed=8)}
    assert len(other & {p.prompt for p in a}) <= 3
    assert len({p.prompt for p in a}) == 60 and len({p.id for p in a}) == 60


@pytest.mark.parametrize("level", LEVELS)
def test_answers_are_exact(level):
    problems = generate_problems(40, seed=level, levels=(level,))
    for p in problems:
        assert p.metadata["level"] == level and KINDS[p.metadata["kind"]][0] == level
        assert recompute(p.prompt) == Fraction(p.ground_truth), p.prompt
        assert re.fullmatch(r"-?\d+(/\d+)?", p.ground_truth)
        if "/" in p.ground_truth:  # reduced, with a denominator > 1
            assert Fraction(p.ground_truth).denominator == int(p.ground_truth.split("/")[1]) > 1


def test_levels_have_distinct_kinds_and_all_levels_are_mixed():
    kinds = {lvl: {p.metadata["kind"] for p in generate_problems(60, seed=1, levels=(lvl,))} for lvl in LEVELS}
    for i in LEVELS:
        for j in LEVELS:
            assert i == j or not kinds[i] & kinds[j]
    mixed = generate_problems(300, seed=2)
    assert {p.metadata["level"] for p in mixed} == set(LEVELS) - {0}  # level 0 is opt-in
    assert {p.metadata["kind"] for p in mixed} == {k for k, (lvl, _, _) in KINDS.items() if lvl}
    with pytest.raises(ValueError, match="levels"):
        generate_problems(3, seed=0, levels=(6,))


def test_exclude_keeps_a_held_out_set_out_of_any_other_draw():
    held = generate_problems(50, seed=3, levels=(0,))
    train = generate_problems(300, seed=3, levels=(0,), exclude={p.prompt for p in held})  # the same stream
    assert len(train) == 300 and not {p.prompt for p in train} & {p.prompt for p in held}
    assert generate_problems(50, seed=3, levels=(0,)) == held


def test_traces_are_short_step_by_step_and_end_in_boxed_answer():
    for p in generate_problems(80, seed=4):
        t = synthetic_trace(p, sample=1, seed=9)
        assert t.teacher == "synthetic" and t.sample == 1 and t.problem == p
        assert t.answer == f"The answer is \\boxed{{{p.ground_truth}}}."
        lines = t.reasoning.splitlines()
        assert len(lines) >= 2 and p.ground_truth in lines[-1]
        assert 10 <= len(t.reasoning.split()) <= 150  # words: a few dozen to ~200 tokens
        assert synthetic_trace(p, sample=1, seed=9) == t


def test_mistake_rate_makes_wrong_final_answers():
    problems = generate_problems(200, seed=5)
    wrong = [synthetic_trace(p, mistake_rate=1.0) for p in problems]
    for p, t in zip(problems, wrong):
        boxed = re.search(r"\\boxed\{(.+)\}", t.answer)[1]
        assert Fraction(boxed) != Fraction(p.ground_truth)
        assert boxed in t.reasoning.splitlines()[-1]  # the last step says the same wrong value
    some = [synthetic_trace(p, mistake_rate=0.3) for p in problems]
    n_wrong = sum(t.answer != f"The answer is \\boxed{{{t.problem.ground_truth}}}." for t in some)
    assert 30 <= n_wrong <= 90
    with pytest.raises(ValueError, match="not made by the synthetic generator"):
        synthetic_trace(problems[0].model_copy(update={"metadata": {}}))


def test_glance_rate_replaces_the_working_of_some_traces_with_the_result_alone():
    problems = generate_problems(200, seed=6, levels=(0, 1, 2))
    plain = [synthetic_trace(p, seed=2) for p in problems]
    glanced = [synthetic_trace(p, seed=2, glance_rate=0.5) for p in problems]
    changed = [g.reasoning != t.reasoning for t, g in zip(plain, glanced)]
    assert 60 <= sum(changed) <= 140
    for t, g, c in zip(plain, glanced, changed):
        assert g.answer == t.answer  # as right as the worked trace
        if c:  # one line, the result and no working
            assert "\n" not in g.reasoning and g.reasoning.startswith("At a glance, ")
            assert len(g.reasoning) < len(t.reasoning)
            assert t.problem.ground_truth in g.reasoning
    # the same traces stay wrong with glances on, and say the same wrong value
    wrong = [synthetic_trace(p, mistake_rate=0.3) for p in problems]
    both = [synthetic_trace(p, mistake_rate=0.3, glance_rate=1.0) for p in problems]
    assert [w.answer for w in wrong] == [b.answer for b in both]
    for b in both:
        assert b.reasoning.startswith("At a glance, ")
        assert re.search(r"\\boxed\{(.+)\}", b.answer)[1] in b.reasoning
