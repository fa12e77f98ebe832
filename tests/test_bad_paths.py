"""Every path-valued key and flag of every stage: a missing path, or a directory that holds no
model or tokenizer, is one line naming the key and the path, exit 2, no traceback.

Before, `--set model=/nonexistent` gave a 281-line Hub-client traceback ("Repo id must use
alphanumeric chars") and exit 1.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reason.cli import app
from reason.records import Problem, write_jsonl
from tiny import save_tiny, write_traces

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/x"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("paths")
    (d / "empty").mkdir()  # a directory with no model and no tokenizer in it
    write_jsonl(d / "problems.jsonl", [Problem(id="p", prompt="What is 1 + 1?", ground_truth="2")])
    write_jsonl(d / "completions.jsonl", [{"completion": "\\boxed{2}", "ground_truth": "2"}])
    return {"dir": d, "problems": d / "problems.jsonl", "traces": Path(write_traces(d / "traces.jsonl", 2)),
            "completions": d / "completions.jsonl",
            "tiny": save_tiny(d / "tiny"), "empty": d / "empty"}


def cases(f: dict[str, Path]) -> list[tuple[list[str], str, str]]:
    """(command, the key or flag the error must name, the bad path)."""
    grpo, sft, dpo = (str(ROOT / "configs" / p)
                      for p in ("demo/grpo.yaml", "demo/sft.yaml", "phi4-mini/stage3-dpo.yaml"))
    tiny, problems, traces = str(f["tiny"]), str(f["problems"]), str(f["traces"])
    out = str(f["dir"] / "out.jsonl")
    return [
        (["eval", "--set", f"model={MISSING}"], "model", MISSING),
        (["eval", "--set", f"model={f['empty']}"], "model", str(f["empty"])),
        (["eval", "--set", f"model={tiny}", "--set", f"problems.path={MISSING}"], "problems.path", MISSING),
        (["rl", "train", "-c", grpo, "--set", f"data.train={problems}", "--set", f"model.path={MISSING}"],
         "model.path", MISSING),
        (["rl", "train", "-c", grpo, "--set", f"data.train={problems}", "--set", f"model.path={f['empty']}"],
         "model.path", str(f["empty"])),
        (["rl", "train", "-c", grpo, "--set", f"model.path={tiny}", "--set", f"data.train={MISSING}"],
         "data.train", MISSING),
        (["rl", "train", "-c", grpo, "--set", f"model.path={tiny}", "--set", f"data.train={problems}",
          "--set", f"data.validation={MISSING}", "--set", "rollout.engine=hf"], "data.validation", MISSING),
        (["rl", "export-verl", "-c", grpo, "-o", str(f["dir"] / "v"), "--set", f"data.train={MISSING}"],
         "data.train", MISSING),
        (["distill", "sft", "-c", sft, "--set", f"model.path={MISSING}"], "model.path", MISSING),
        (["distill", "sft", "-c", sft, "--set", f"model.path={tiny}", "--set", f"data.train.0.path={MISSING}"],
         "data.train.0.path", MISSING),
        (["distill", "sft", "-c", sft, "--set", f"model.path={tiny}", "--set", f"data.train.0.path={traces}",
          "--set", f"data.eval=[{{path: {MISSING}}}]"], "data.eval.0.path", MISSING),
        (["distill", "dpo", "-c", dpo, "--set", f"model.path={MISSING}"], "model.path", MISSING),
        (["distill", "dpo", "-c", dpo, "--set", f"model.path={tiny}", "--set", f"dpo.reference={f['empty']}",
          "--set", "train.autocast=none"], "dpo.reference", str(f["empty"])),
        (["distill", "generate", "-p", MISSING, "-o", out, "--set", "engine=synthetic"], "--problems", MISSING),
        (["distill", "generate", "-p", problems, "-o", out, "--set", "engine=hf", "--set", f"model={MISSING}"],
         "model", MISSING),
        (["distill", "select", "-p", MISSING, "-o", out], "--problems", MISSING),
        (["distill", "select", "-p", problems, "-o", out, "--set", "engine=hf", "--set", f"model={f['empty']}"],
         "model", str(f["empty"])),
        (["distill", "filter", "--in", MISSING, "-o", out, "--verify"], "--in", MISSING),
        (["distill", "filter", "--in", traces, "-o", out, "--max-tokens", "9", "--tokenizer", str(f["empty"])],
         "tokenizer", str(f["empty"])),
        (["distill", "filter", "--in", traces, "-o", out, "--decontam", MISSING], "decontam.eval_files", MISSING),
        (["distill", "pairs", "--in", MISSING, "-o", out], "--in", MISSING),
        (["distill", "pts", "-p", MISSING, "-o", out], "--problems", MISSING),
        (["distill", "pts", "-p", problems, "-o", out, "--set", "engine=hf", "--set", f"model={MISSING}"],
         "model", MISSING),
        (["distill", "pts", "-p", problems, "-o", out, "--set", f"model={f['empty']}"], "model", str(f["empty"])),
        (["distill", "judge-pairs", "--policy", MISSING, "--reference", traces, "-o", out, "--set", "model=j"],
         "--policy", MISSING),
        (["distill", "judge-pairs", "--policy", traces, "--reference", MISSING, "-o", out, "--set", "model=j"],
         "--reference", MISSING),
        (["distill", "problems", "--from", MISSING, "-o", out], "--from", MISSING),
        (["distill", "problems", "--synthetic", "3", "--exclude", MISSING, "-o", out], "--exclude", MISSING),
        (["reward", "score", MISSING, "-o", out], "COMPLETIONS", MISSING),
        (["reward", "score", str(f["completions"]), "-o", out, "--tokenizer", MISSING], "--tokenizer", MISSING),
        (["demo", "-c", str(ROOT / "configs/demo/demo.yaml"), "--set", f"model={MISSING}",
          "--set", f"runs_dir={f['dir'] / 'runs'}"], "model", MISSING),
    ]


def test_every_bad_path_is_one_line_naming_its_key(files):
    runner = CliRunner()
    for args, key, path in cases(files):
        r = runner.invoke(app, args)
        out = (r.stdout + r.stderr).strip()
        where = " ".join(args[:2])
        assert r.exit_code == 2, (where, r.exit_code, repr(r.exception), out[-500:])
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert "Traceback" not in out and len(errors) == 1, (where, out[-800:])
        assert errors[0].startswith(f"error: {key}: {path}"), (where, key, out)
        assert not (files["dir"] / "out.jsonl").exists(), where
