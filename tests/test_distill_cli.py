"""`reason distill ...` run as users run it: `python -m reason.cli distill` in a subprocess.

The pipeline problems -> generate (built-in synthetic teacher) -> filter -> pairs ->
sft -> dpo runs once per module on planted data (a contaminated problem, a
near miss that must survive, a duplicate); counts are checked against what the
files themselves say. Bad input must exit 2 naming the file:line or the key, and
write nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from reason.synthetic import make_problem
from reason.records import Trace, read_jsonl, write_jsonl
from test_distill_select import RATES, SCRIPT, STRONG, ScriptedServer, scripted_problems
from tiny import save_tiny

K = 4  # traces per problem


def distill(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reason.cli", "distill", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def ok(*args, cwd: Path) -> tuple[dict, str]:
    """Run a command that must succeed; its stdout is one JSON report."""
    done = distill(*args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def lines(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def _correct(t: Trace) -> bool:
    # The synthetic teacher writes "The answer is \boxed{X}."; X is right exactly when it is the gold string.
    return t.answer == f"The answer is \\boxed{{{t.problem.ground_truth}}}."


# ---------------------------------------------------------------- the pipeline, once

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pipeline")
    out = {"dir": d}
    out["problems"], _ = ok("problems", "--synthetic", 12, "--seed", 3, "--levels", "1", "--out", "train.jsonl",
                            "--eval-out", "eval.jsonl", "--eval-n", 4, cwd=d)
    train, held = lines(d / "train.jsonl"), lines(d / "eval.jsonl")
    ev = held[0]["metadata"]["params"]
    near = make_problem(held[0]["metadata"]["kind"], {**ev, "b": ev["b"] + 1})  # one number off: not contaminated
    planted = [{**held[0], "id": "planted-contaminated"}, {**train[0], "id": "planted-duplicate"},
               near.model_dump()]
    write_jsonl(d / "train.jsonl", train + planted)
    out["near"] = near.id
    out["clean"], out["clean_err"] = ok("filter", "--in", "train.jsonl", "--out", "clean.jsonl", "--dropped",
                                        "dropped.jsonl", "--dedup", "--decontam", "eval.jsonl", cwd=d)
    out["generate"], _ = ok("generate", "-p", "clean.jsonl", "-o", "traces.jsonl", "--set", "engine=synthetic",
                            "--set", f"k={K}", "--set", "mistake_rate=0.5", "--set", "seed=1", cwd=d)
    out["verified"], out["verified_err"] = ok("filter", "--in", "traces.jsonl", "--out", "verified.jsonl",
                                              "--verify", "--format", "--dropped", "wrong.jsonl", cwd=d)
    out["pairs"], out["pairs_err"] = ok("pairs", "--in", "traces.jsonl", "--out", "pairs.jsonl", cwd=d)
    return out


@pytest.mark.slow
def test_problems_writes_disjoint_train_and_eval(run):
    d = run["dir"]
    assert run["problems"] == {"problems": 12, "eval": 4}
    held = {p["prompt"] for p in lines(d / "eval.jsonl")}
    assert len(held) == 4 and not held & {p["prompt"] for p in lines(d / "train.jsonl")[:12]}


@pytest.mark.slow
def test_filter_drops_the_planted_problems_and_says_why(run):
    d = run["dir"]
    report = run["clean"]
    assert (report["seen"], report["kept"]) == (15, 13)
    assert [(f["name"], f["dropped"]) for f in report["filters"]] == [
        ("decontaminate", {"contaminated": 1}), ("dedup", {"duplicate": 1})]
    assert report["filters"][0]["details"]["by_eval_file"] == {"eval.jsonl": 1}
    dropped = {r["record"]["id"]: (r["filter"], r["reason"]) for r in lines(d / "dropped.jsonl")}
    assert dropped == {"planted-contaminated": ("decontaminate", "contaminated"),
                       "planted-duplicate": ("dedup", "duplicate")}
    kept = [p["id"] for p in lines(d / "clean.jsonl")]
    assert run["near"] in kept and len(kept) == len(set(kept)) == 13
    assert "decontaminate" in run["clean_err"] and "contaminated 1" in run["clean_err"]


@pytest.mark.slow
def test_verify_filter_keeps_exactly_the_correct_traces(run):
    d = run["dir"]
    assert run["generate"]["generated"] == 13 * K
    traces = list(read_jsonl(d / "traces.jsonl", Trace))
    right = [t for t in traces if _correct(t)]
    assert 0 < len(right) < len(traces)  # mistake_rate 0.5 gives both kinds
    report = run["verified"]
    assert [(f["name"], f["kept"]) for f in report["filters"]] == [("format", len(traces)), ("verified", len(right))]
    assert report["filters"][1]["dropped"] == {"incorrect": len(traces) - len(right)}
    assert [(t.problem.id, t.sample) for t in read_jsonl(d / "verified.jsonl", Trace)] == \
        [(t.problem.id, t.sample) for t in right]
    assert {r["reason"] for r in lines(d / "wrong.jsonl")} == {"incorrect"}


@pytest.mark.slow
def test_pairs_pair_each_correct_trace_with_a_wrong_one(run):
    d = run["dir"]
    traces = list(read_jsonl(d / "traces.jsonl", Trace))
    good = Counter(t.problem.id for t in traces if _correct(t))
    bad = Counter(t.problem.id for t in traces if not _correct(t))
    ids = {t.problem.id for t in traces}
    expected = sum(min(4, good[i] * bad[i]) for i in ids)  # PairOptions.max_pairs_per_problem = 4
    pairs = lines(d / "pairs.jsonl")
    assert run["pairs"]["kept"] == len(pairs) == expected > 0
    for p in pairs:
        gold = f"\\boxed{{{p['problem']['ground_truth']}}}"
        assert gold in p["chosen"] and gold not in p["rejected"]
    no_correct, no_incorrect = sum(good[i] == 0 for i in ids), sum(bad[i] == 0 for i in ids)
    assert run["pairs"]["dropped"] == {k: v for k, v in (("no_correct", no_correct), ("no_incorrect", no_incorrect))
                                       if v}


@pytest.mark.slow
def test_sft_then_dpo_train_on_the_pipeline_outputs(run, tmp_path):
    d = run["dir"]
    model = save_tiny(tmp_path / "tiny")
    train = {"batch_size": 4, "micro_batch": 2, "max_steps": 2, "autocast": "none", "save_every": 0}
    sft = {"model": {"path": str(model)}, "chat": {"system_prompt": None},
           "data": {"train": [{"path": str(d / "verified.jsonl")}], "max_len": 512, "eval_fraction": 0.25},
           "train": {**train, "out_dir": str(tmp_path / "sft")}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    done = distill("sft", "--config", tmp_path / "sft.yaml", "--set", "train.max_step=2", cwd=tmp_path)
    assert done.returncode == 2 and "'train.max_step': unknown key" in done.stderr, done.stderr
    result, _ = ok("sft", "--config", tmp_path / "sft.yaml", "--set", "optim.lr=1e-3", cwd=tmp_path)
    assert result["step"] == 2 and (Path(result["final_dir"]) / "model.safetensors").is_file()
    dpo = {**sft, "model": {"path": result["final_dir"]},
           "data": {**sft["data"], "train": [{"path": str(d / "pairs.jsonl")}]},
           "train": {**train, "out_dir": str(tmp_path / "dpo")}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    result, _ = ok("dpo", "--config", tmp_path / "dpo.yaml", cwd=tmp_path)
    assert result["step"] == 2 and (Path(result["final_dir"]) / "model.safetensors").is_file()


# ---------------------------------------------------------------- other inputs

def test_problems_from_parquet_maps_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"question": ["What is 6 * 7?", "Name the capital of France."], "final": ["42", "Paris"],
            "idx": [7, 8], "topic": ["arith", "geo"]}
    pq.write_table(pa.table(rows), tmp_path / "set.parquet")
    report, _ = ok("problems", "--from", "set.parquet", "--out", "p.jsonl", "--field", "ground_truth=final",
                   "--field", "id=idx", "--source", "quiz", cwd=tmp_path)
    assert report == {"problems": 2, "eval": 0}
    got = lines(tmp_path / "p.jsonl")
    assert [(p["id"], p["prompt"], p["ground_truth"], p["source"], p["metadata"]) for p in got] == [
        ("7", "What is 6 * 7?", "42", "quiz", {"topic": "arith"}),
        ("8", "Name the capital of France.", "Paris", "quiz", {"topic": "geo"})]
    done = distill("problems", "--from", "set.parquet", "--out", "q.jsonl", cwd=tmp_path)  # no 'final' mapping
    assert done.returncode == 2 and "set.parquet: row 0: no answer field" in done.stderr
    assert not (tmp_path / "q.jsonl").exists()


def test_length_filter_counts_tokens_with_the_given_tokenizer(tmp_path):
    from distill.synthetic import synthetic_trace
    from reason.synthetic import generate_problems
    from reason.chat import ChatConfig, format_response
    from tiny import tiny_tokenizer

    traces = [synthetic_trace(p) for p in generate_problems(8, seed=0, levels=(1, 2, 3))]
    write_jsonl(tmp_path / "t.jsonl", traces)
    tok = tiny_tokenizer()
    lengths = [len(tok.encode(format_response(t.reasoning, t.answer, ChatConfig()), add_special_tokens=False))
               for t in traces]
    cut = sorted(lengths)[4]
    assert 0 < sum(n > cut for n in lengths) < len(lengths)
    tok.save_pretrained(tmp_path / "tok")
    report, _ = ok("filter", "--in", "t.jsonl", "--out", "k.jsonl", "--max-tokens", cut, "--tokenizer", "tok",
                   cwd=tmp_path)
    assert report["filters"][0]["dropped"] == {"too_long": sum(n > cut for n in lengths)}
    assert report["filters"][0]["details"]["max_tokens"] == max(lengths)
    assert len(lines(tmp_path / "k.jsonl")) == sum(n <= cut for n in lengths)


def test_select_command_against_an_endpoint(tmp_path):
    write_jsonl(tmp_path / "problems.jsonl", scripted_problems())
    server = ScriptedServer(SCRIPT, {"strong": STRONG})
    try:
        report, err = ok("select", "-p", "problems.jsonl", "-o", "teachable.jsonl", "--dropped", "rest.jsonl",
                         "--set", "engine=openai", "--set", "model=ref", "--set", f"base_url={server.url}",
                         "--set", "verify.workers=1", "--set", "reference.model=strong", cwd=tmp_path)
    finally:
        server.close()
    assert (report["seen"], report["kept"]) == (5, 2)
    assert report["details"]["histogram"] == [1, 0, 1, 0, 0, 1, 1, 0, 0, 1]  # .0 .25 .5 .625 1.0 in tenths
    kept = lines(tmp_path / "teachable.jsonl")
    assert {p["prompt"]: p["metadata"]["pass_rate"] for p in kept} == {"What is 2 + 2?": 0.25, "What is 3 + 3?": 0.5}
    rest = lines(tmp_path / "rest.jsonl")
    assert {r["record"]["prompt"]: (r["filter"], r["record"]["metadata"]["pass_rate"]) for r in rest} == \
        {p: ("select", r) for p, r in RATES.items() if p not in ("What is 2 + 2?", "What is 3 + 3?")}
    assert "pass rates over n=8 samples" in err


# ---------------------------------------------------------------- bad input

def test_malformed_line_names_file_and_line_and_writes_nothing(tmp_path):
    good = make_problem("add", {"a": 123, "b": 456}).model_dump_json()
    (tmp_path / "in.jsonl").write_text(f"{good}\n\n{{\"id\": \"x\", \"prompt\": \n")
    for cmd in (["filter", "--dedup"], ["pairs"]):
        done = distill(*cmd, "--in", "in.jsonl", "--out", "out.jsonl", "--dropped", "d.jsonl", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "in.jsonl:3:" in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "d.jsonl").exists()


def test_unknown_set_key_is_named(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [make_problem("add", {"a": 123, "b": 456})])
    for cmd, key in ((["filter", "--in", "in.jsonl", "--out", "o.jsonl", "--dedup"], "dedup.treshold"),
                     (["select", "-p", "in.jsonl", "-o", "o.jsonl"], "dedup"),
                     (["pairs", "--in", "in.jsonl", "--out", "o.jsonl"], "dedup")):
        done = distill(*cmd, "--set", "dedup.treshold=0.5", cwd=tmp_path)
        assert done.returncode == 2, (cmd, done.stderr)
        assert f"'{key}': unknown key" in done.stderr, done.stderr
        assert not (tmp_path / "o.jsonl").exists()


def test_filters_that_cannot_apply_are_refused(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [make_problem("add", {"a": 123, "b": 456})])
    done = distill("filter", "--in", "in.jsonl", "--out", "o.jsonl", cwd=tmp_path)
    assert done.returncode == 2 and "no filter chosen" in done.stderr
    done = distill("filter", "--in", "in.jsonl", "--out", "o.jsonl", "--verify", cwd=tmp_path)
    assert done.returncode == 2 and "needs traces or rollouts" in done.stderr
    done = distill("pairs", "--in", "in.jsonl", "--out", "o.jsonl", cwd=tmp_path)
    assert done.returncode == 2 and "holds problems" in done.stderr
    done = distill("problems", "--synthetic", "3", "--from", "in.jsonl", "--out", "o.jsonl", cwd=tmp_path)
    assert done.returncode == 2 and "exactly one of" in done.stderr
    assert not (tmp_path / "o.jsonl").exists()
