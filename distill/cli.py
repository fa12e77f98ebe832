"""`reason distill ...`: the distillation-data commands (mounted by `reason/cli.py`).

One command per step of the Phi-4-reasoning and Phi-4-mini-reasoning data recipes
(arXiv 2504.21318 section 3, arXiv 2504.21233 section 3), each a thin shell over a
typed config (`--config YAML`, `--set KEY=VALUE`) and a library function:
  problems  seed problems: the built-in synthetic generator, or an external set normalised
  generate  k teacher traces per problem (distill.generate)
  filter    decontam / format / length / verify / dedup (distill.filter_chain)
  select    teachable prompts by a reference model's pass rate (distill.select)
  pairs     preference pairs for rollout DPO (distill.pairs)
  pts       Pivotal Token Search: single-token pairs (Phi-4, arXiv 2412.08905 section 4.3; distill.pts)
  judge-pairs  judge-guided pairs: the trained model's response against a reference (distill.judge)
  sft, dpo  the trainers (distill.sft, distill.dpo)
Bad input exits 2 with one line naming the file, line or key; outputs are written
whole (atomically) only after all input was read. Heavy imports happen inside commands.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from reason.config import load_config
from reason.console import DEVICE_MEMORY, PLAN, SHAPE, console, memory_plan, user_errors
from reason.errors import UserError
from reason.records import Problem, Rollout, Trace, existing, read_jsonl, write_jsonl

app = typer.Typer(no_args_is_help=True, add_completion=False)
CONFIG = typer.Option(None, "--config", "-c", help="YAML config")
SET = typer.Option([], "--set", help="override a config key: KEY=VALUE (repeatable)")
DROPPED = typer.Option(None, "--dropped", help="also write what was dropped, with filter, reason and detail")
SHARDS = typer.Option(None, "--shards", min=1, help="fan out over the Ray cluster this runs in (a Ray job), "
                                                     "in N tasks; the output equals one process's")


@app.callback()
def distill():
    """Distillation data: teacher traces and the datasets made from them."""


# ---------------------------------------------------------------- shared helpers

@contextlib.contextmanager
def _teacher_errors():
    """A teacher that refuses every request (bad key, unknown model) ends the run with status 1."""
    from distill.teacher import TeacherError

    try:
        yield
    except TeacherError as e:
        console.print(f"[bold red]error:[/] the teacher refused the run: {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def _read_records(path: Path) -> list:
    """Traces, rollouts or problems; the first record says which the file holds."""
    first = next(read_jsonl(existing(path, "--in")), None)
    if first is None:
        return []
    kind = Trace if "reasoning" in first else Rollout if "completion" in first else Problem
    return list(read_jsonl(path, kind))


def _write(out: Path, kept, dropped: Path | None, tagged) -> None:
    """Kept records to `out`; the dropped, (filter name, Dropped) pairs, one JSON line each to `dropped`."""
    write_jsonl(out, kept)
    if dropped is not None:
        write_jsonl(dropped, ({"filter": name, **d.model_dump(mode="json")} for name, d in tagged))


def _print_bins(title: str, head: str, lo: float, hi: float, spec: str, counts: dict[str, list[int]]) -> None:
    """A histogram over [lo, hi] in equal bins: each bin's counts by column, a bar for the first column."""
    first = next(iter(counts.values()))
    bins, top = len(first), max(first, default=0) or 1
    table = Table(title=title)
    for col in (head, *counts, ""):
        table.add_column(col, justify="right" if col in counts else "left")
    for i, row in enumerate(zip(*counts.values())):
        a, b = lo + (hi - lo) * i / bins, lo + (hi - lo) * (i + 1) / bins
        label = f"[{a:{spec}}, {b:{spec}}" + ("]" if i == bins - 1 else ")")
        table.add_row(escape(label), *map(str, row), "#" * round(30 * row[0] / top))
    console.print(table)


def _print_reports(reports, title: str) -> None:
    table = Table(title=title)
    for col in ("step", "seen", "kept", "dropped", "why"):
        table.add_column(col, justify="left" if col in ("step", "why") else "right")
    for r in reports:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(r.dropped.items())) or "-"
        table.add_row(r.name, str(r.seen), str(r.kept), str(sum(r.dropped.values())), escape(why))
    console.print(table)


# ---------------------------------------------------------------- problems

def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--levels {text!r}: expected comma-separated integers, e.g. 1,2,3") from None


def _fields(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column:
            raise UserError(f"--field {pair!r}: expected NAME=COLUMN, e.g. prompt=question")
        out[name] = column
    return out


@app.command("problems")
def problems_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="problems JSONL to write"),
    synthetic: Optional[int] = typer.Option(None, "--synthetic", min=1, help="make N built-in synthetic problems"),
    seed: int = typer.Option(0, "--seed", help="synthetic: generator seed"),
    levels: str = typer.Option("1,2,3,4,5", "--levels", help="synthetic: difficulty levels, e.g. 1,2,3"),
    eval_out: Optional[Path] = typer.Option(None, "--eval-out", help="synthetic: also write a held-out set "
                                                                      "that shares no prompt with --out"),
    eval_n: int = typer.Option(0, "--eval-n", min=0, help="synthetic: problems in the held-out set"),
    from_: Optional[Path] = typer.Option(None, "--from", help="normalise a JSONL / Parquet / HF dataset dir"),
    field: list[str] = typer.Option([], "--field", help="NAME=COLUMN: take prompt, ground_truth or id "
                                                        "from COLUMN (dotted for nested); repeatable"),
    source: Optional[str] = typer.Option(None, "--source", help="source name recorded on every problem"),
    allow_no_answer: bool = typer.Option(False, "--allow-no-answer", help="--from: keep rows without an answer"),
    exclude: list[Path] = typer.Option([], "--exclude", help="synthetic: never draw a prompt of this problems "
                                                             "file (a held-out set); repeatable"),
):
    """Write seed problems: built-in synthetic ones, or an external set as Problem JSONL."""
    from reason.problems import load_problems

    with user_errors():
        if (synthetic is None) == (from_ is None):
            raise UserError("give exactly one of --synthetic N or --from FILE")
        if (eval_out is None) != (eval_n == 0) or (eval_out and from_) or (exclude and from_):
            raise UserError("--eval-out and --eval-n go together, with --synthetic; --exclude needs --synthetic")
        held_out = []
        if synthetic is not None:
            from reason.synthetic import generate_problems

            seen = {p.prompt for path in exclude for p in load_problems(existing(path, "--exclude"),
                                                                         require_answer=False)}
            items = generate_problems(synthetic + eval_n, seed, _levels(levels), source or "synthetic", seen)
            items, held_out = items[eval_n:], items[:eval_n]
        else:
            items = load_problems(existing(from_, "--from"), _fields(field) or None, source,
                                  require_answer=not allow_no_answer)
        write_jsonl(out, items)
        if eval_out:
            write_jsonl(eval_out, held_out)
    print(json.dumps({"problems": len(items), "eval": len(held_out)}))


# ---------------------------------------------------------------- generate

@app.command("generate")
def generate(
    problems: Path = typer.Option(..., "--problems", "-p", help="problems: JSONL, Parquet or HF dataset dir"),
    out: Path = typer.Option(..., "--out", "-o", help="traces JSONL; appended to, and resumed from"),
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
    shards: Optional[int] = SHARDS,
):
    """Sample k teacher traces per problem; a killed run resumes where it stopped."""
    from distill.fanout import generate_fanout
    from distill.generate import GenerateConfig, generate_traces
    from reason.problems import load_problems

    with user_errors(), _teacher_errors():
        cfg = load_config(GenerateConfig, config, set_)
        todo = load_problems(existing(problems, "--problems"), require_answer=False)
        report = generate_fanout(todo, out, cfg, shards) if shards else generate_traces(todo, out, cfg)
    print(json.dumps({**asdict(report), "missing": report.missing}))
    if report.failed:
        console.print(f"[yellow]{report.failed} of {report.total} pairs failed "
                      f"({escape(str(report.failures))}); run the same command again to retry them[/]")


# ---------------------------------------------------------------- filter

@app.command("filter")
def filter_cmd(
    in_: Path = typer.Option(..., "--in", "-i", help="traces, rollouts or problems JSONL"),
    out: Path = typer.Option(..., "--out", "-o", help="the records every filter kept"),
    dropped: Optional[Path] = DROPPED,
    verify: bool = typer.Option(False, "--verify", help="keep answers verified equal to the ground truth"),
    format_: bool = typer.Option(False, "--format", help="keep complete responses with one clean think block"),
    min_tokens: Optional[int] = typer.Option(None, "--min-tokens", help="drop responses shorter than this"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="drop responses longer than this"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer dir for token counts "
                                                                      "(default: the embedded model's)"),
    dedup: bool = typer.Option(False, "--dedup", help="drop exact and near duplicates"),
    decontam: list[Path] = typer.Option([], "--decontam", help="evaluation file to decontaminate against; "
                                                               "repeatable"),
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
):
    """Run the chosen filters (decontam, format, length, verify, dedup, in that order) and report."""
    from distill.filter_chain import ORDER, FilterConfig, run_filters

    with user_errors():
        cfg = load_config(FilterConfig, config, set_)
        steps = set(cfg.apply) | {s for s, on in (("verify", verify), ("format", format_), ("dedup", dedup)) if on}
        if min_tokens is not None or max_tokens is not None:
            steps.add("length")
            cfg.length.min_tokens = cfg.length.min_tokens if min_tokens is None else min_tokens
            cfg.length.max_tokens = cfg.length.max_tokens if max_tokens is None else max_tokens
        if decontam:
            steps.add("decontam")
            cfg.decontam.eval_files = [*cfg.decontam.eval_files, *map(str, decontam)]
        cfg.tokenizer = tokenizer or cfg.tokenizer
        cfg.apply = [s for s in ORDER if s in steps]
        if not cfg.apply:
            raise UserError("no filter chosen: pass --verify, --format, --min/--max-tokens, --dedup or --decontam")
        records = _read_records(in_)
        result = run_filters(records, cfg)
        _write(out, result.kept, dropped, result.dropped)
    _print_reports(result.reports, f"filters: kept {len(result.kept)} of {len(records)}")
    print(json.dumps({"seen": len(records), "kept": len(result.kept),
                      "filters": [r.model_dump(mode="json") for r in result.reports]}))


# ---------------------------------------------------------------- select

@app.command("select")
def select_cmd(
    problems: Path = typer.Option(..., "--problems", "-p", help="problems: JSONL, Parquet or HF dataset dir"),
    out: Path = typer.Option(..., "--out", "-o", help="the teachable problems, with metadata.pass_rate"),
    dropped: Optional[Path] = DROPPED,
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
    shards: Optional[int] = SHARDS,
):
    """Keep problems a reference model solves sometimes but not always (pass rate in a band)."""
    from distill.fanout import select_fanout
    from distill.select import SelectConfig, select_teachable
    from reason.problems import load_problems

    with user_errors(), _teacher_errors():
        cfg = load_config(SelectConfig, config, set_)
        todo = load_problems(existing(problems, "--problems"), require_answer=False)
        result = select_fanout(todo, cfg, shards) if shards else select_teachable(todo, cfg)
        _write(out, result.kept, dropped, [("select", d) for d in result.dropped])
    _print_reports([result.report], f"select: kept {result.report.kept} of {result.report.seen}")
    d = result.report.details
    _print_bins(f"pass rates over n={d['n']} samples; kept band {d['band']}", "pass rate", 0.0, 1.0, ".2f",
                {"problems": d["histogram"], "kept": d["histogram_kept"]})
    print(json.dumps(result.report.model_dump(mode="json")))


# ---------------------------------------------------------------- pairs

@app.command("pairs")
def pairs_cmd(
    in_: Path = typer.Option(..., "--in", "-i", help="traces or rollouts JSONL, several per problem"),
    out: Path = typer.Option(..., "--out", "-o", help="preference pairs JSONL (chosen correct, rejected not)"),
    dropped: Optional[Path] = DROPPED,
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
):
    """Build (chosen = verified correct, rejected = incorrect) pairs for rollout DPO."""
    from distill.pairs import PairOptions, preference_pairs

    with user_errors():
        opts = load_config(PairOptions, config, set_)
        records = _read_records(in_)
        if records and isinstance(records[0], Problem):
            raise UserError(f"{in_}: holds problems; pairs need traces or rollouts")
        result = preference_pairs(records, opts)
        _write(out, result.kept, dropped, [("pairs", d) for d in result.dropped])
    _print_reports([result.report], f"pairs: {result.report.kept} from {result.report.seen} responses")
    print(json.dumps(result.report.model_dump(mode="json")))


# ---------------------------------------------------------------- pivotal token search

@app.command("pts")
def pts_cmd(
    problems: Path = typer.Option(..., "--problems", "-p", help="problems with answers: JSONL, Parquet or "
                                                                 "HF dataset dir"),
    out: Path = typer.Option(..., "--out", "-o", help="single-token DPO pairs (TokenPair JSONL), written whole"),
    log: Optional[Path] = typer.Option(None, "--log", help="the search log a killed run resumes from "
                                                           "(default: OUT's name with .log.jsonl)"),
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
    shards: Optional[int] = SHARDS,
):
    """Pivotal Token Search: where one token of the model's solution moves p(success), a DPO pair."""
    from distill.fanout import pts_fanout
    from distill.pts import PTSConfig, pivotal_pairs
    from reason.problems import load_problems

    with user_errors():
        cfg = load_config(PTSConfig, config, set_)
        todo = load_problems(existing(problems, "--problems"), require_answer=True)
        r = pts_fanout(todo, out, cfg, shards, log) if shards else pivotal_pairs(todo, out, cfg, log)
    skipped = ", ".join(f"{why} {n}" for why, n in sorted(r.skipped.items())) or "none"
    console.print(f"pts: {r.searched} of {r.problems} problems searched (skipped: {skipped}); {r.pivots} pivots, "
                  f"{r.pairs} pairs ({r.unpaired} pivots without one); {r.estimates} prefixes sampled, where a "
                  f"token-by-token scan samples {r.scan_estimates}")
    _print_bins("Δp = p_after - p_before at each pivot", "Δp", -1.0, 1.0, "+.1f", {"pivots": r.delta_histogram})
    print(json.dumps(asdict(r)))


# ---------------------------------------------------------------- judge-guided pairs

@app.command("judge-pairs")
def judge_pairs_cmd(
    policy: Path = typer.Option(..., "--policy", help="the trained model's responses: traces or rollouts JSONL"),
    reference: Path = typer.Option(..., "--reference", help="reference responses to the same problems: a "
                                                            "teacher's traces, or a second engine's"),
    out: Path = typer.Option(..., "--out", "-o", help="the kept pairs (PreferencePair JSONL), written whole"),
    log: Optional[Path] = typer.Option(None, "--log", help="every prompt's verdicts, resumed from "
                                                           "(default: OUT's name with .log.jsonl)"),
    config: Optional[Path] = CONFIG,
    set_: list[str] = SET,
):
    """Judge-guided pairs: an OpenAI-compatible judge compares both responses, twice, order swapped."""
    from distill.judge import JudgeConfig, judge_pairs

    with user_errors(), _teacher_errors():
        cfg = load_config(JudgeConfig, config, set_)
        report = judge_pairs(existing(policy, "--policy"), existing(reference, "--reference"), out, cfg, log)
    done = report.outcomes
    console.print(f"judge-pairs: {report.prompts} prompts: kept {done.get('kept', 0)} "
                  f"(the policy's response chosen in {report.policy_won}), disagree {done.get('disagree', 0)}, "
                  f"tie {done.get('tie', 0)}, error {done.get('error', 0)} {escape(str(report.errors or ''))}")
    print(json.dumps(asdict(report)))


# ---------------------------------------------------------------- trainers

@app.command("sft")
def sft(config: Path = typer.Option(..., "--config", "-c", help="SFT recipe YAML"), set_: list[str] = SET,
        plan: bool = PLAN, device_memory: Optional[str] = DEVICE_MEMORY, shape: Optional[str] = SHAPE,
        gpus: int = typer.Option(1, "--gpus", min=1, help="for --plan: processes under torchrun (FSDP shards)")):
    """Supervised fine-tuning on traces (Phi-4-reasoning SFT, Phi-4-mini stages 1-2)."""
    from distill.sft import SFTConfig, sft_setup, train_sft

    with user_errors():
        cfg = load_config(SFTConfig, config, set_)
    if plan:
        return memory_plan(sft_setup(cfg, gpus), cfg.model.path, device_memory, shape, f"SFT memory plan: {config}")
    with user_errors():
        result = train_sft(cfg)
    print(json.dumps(asdict(result), default=str))


@app.command("dpo")
def dpo(config: Path = typer.Option(..., "--config", "-c", help="DPO recipe YAML"), set_: list[str] = SET):
    """Rollout preference learning on pairs (Phi-4-mini stage 3)."""
    from distill.dpo import DPOConfig, train_dpo

    with user_errors():
        result = train_dpo(load_config(DPOConfig, config, set_))
    print(json.dumps(asdict(result), default=str))
