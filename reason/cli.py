"""The `reason` command line: one thin command per stage over typed configs.

Each stage's package adds its own sub-app (`reason distill ...`, `reason rl ...`);
heavy imports happen inside commands so `reason --help` stays instant.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from distill.cli import app as distill_app
from reason.console import console, progress, user_errors
from rl.cli import app as rl_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
reward_app = typer.Typer(no_args_is_help=True, help="Verifiable rewards: list and score.")
app.add_typer(reward_app, name="reward")

# The stage packages keep their CLI modules light (heavy imports inside commands).
app.add_typer(distill_app, name="distill", help="Teacher traces, filters, SFT and DPO.")
app.add_typer(rl_app, name="rl", help="GRPO: train locally or on a Ray cluster (verl).")


@reward_app.command("list")
def reward_list():
    """List the rewards that recipes can name (built-ins and installed plugins)."""
    from rewards.registry import available

    for name in available():
        print(name)


@app.command("eval")
def eval_(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="EvalConfig YAML (e.g. configs/eval/phi4.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: KEY=VALUE"),
):
    """Sample n answers per problem, verify, report pass@1/pass@k/maj@k, lengths, format rate."""
    from reason.config import load_config
    from reason.eval import EvalConfig, run_eval

    with user_errors():
        summary = run_eval(load_config(EvalConfig, config, set_))
    print(json.dumps(summary["overall"], indent=2))


@app.command("demo")
def demo(
    config: Path = typer.Option(Path("configs/demo/demo.yaml"), "--config", "-c", help="demo recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: KEY=VALUE"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the run and start over"),
):
    """The end-to-end demo: eval base, SFT, eval, GRPO, eval; writes runs/<name>/report.md."""
    from reason.config import load_config
    from reason.demo import DemoConfig, run_demo

    with user_errors():
        run_demo(load_config(DemoConfig, config, set_), fresh=fresh)


def _reward_config(config: Optional[Path], rewards: list[str], overrides: list[str], cls=None):
    from pydantic import ValidationError

    from reason.config import load_config
    from reason.errors import UserError
    from rewards.registry import RewardConfig, RewardTerm

    cfg = load_config(cls or RewardConfig, config, overrides)
    if rewards:  # NAME or NAME=WEIGHT; '=' because ':' belongs to module:function specs
        terms = []
        for spec in rewards:
            name, _, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
            try:
                weight = float(weight)
            except ValueError:
                raise UserError(f"--reward {spec!r}: weight must be a number") from None
            try:
                terms.append(RewardTerm(name=name, weight=weight))
            except ValidationError as e:  # an unknown reward
                raise UserError(f"--reward {spec!r}: {e.errors()[0]['msg']}") from None
        cfg.terms = terms
    return cfg


@reward_app.command("score")
def reward_score(
    completions: Path = typer.Argument(..., help="JSONL: completion, ground_truth, num_tokens, finish_reason, "
                                                 "source, id"),
    out: Path = typer.Option(..., "--out", "-o", help="per-sample scores and components (JSONL)"),
    reward: list[str] = typer.Option([], "--reward", "-r", help="NAME[=WEIGHT], repeatable; default phi4_plus"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML reward config (terms, workers, timeout)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: KEY=VALUE"),
    tokenizer: Optional[str] = typer.Option(None, help="count num_tokens with this tokenizer where missing"),
    summary_out: Optional[Path] = typer.Option(None, "--summary", help="also write the summary as JSON"),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="fan out over the Ray cluster this runs "
                                                                        "in (a Ray job), in N tasks"),
):
    """Score completions in parallel with hard timeouts; print a summary.

    A line may set think_open / think_close for custom think tags.
    """
    from reason.records import existing, read_jsonl, write_jsonl
    from rewards.score import ScoreSample, Summary, score_samples

    with user_errors():
        cfg = _reward_config(config, reward, set_)
        samples = list(read_jsonl(existing(completions, "COMPLETIONS"), ScoreSample))
        if tokenizer:  # count num_tokens where a line has none
            from reason.models import load_tokenizer

            tok = load_tokenizer(tokenizer, "--tokenizer")
            for s in samples:
                if s.num_tokens is None:
                    s.num_tokens = len(tok(s.completion, add_special_tokens=False)["input_ids"])
        if shards:
            from reason.fanout import score_fanout

            rows = score_fanout(samples, cfg, shards)
            summary = Summary.of(rows, [s.source for s in samples])
        else:
            with progress() as bar:
                task = bar.add_task("scoring", total=len(samples))
                rows, summary = score_samples(samples, cfg.terms, cfg.workers, cfg.timeout,
                                              on_result=lambda k: bar.advance(task, k))
        write_jsonl(out, rows)
        if summary_out:
            summary_out.write_text(json.dumps(summary.as_dict(), indent=2))
    _print_summary(summary.as_dict())


@reward_app.command("serve")
def reward_serve(
    reward: list[str] = typer.Option([], "--reward", "-r", help="NAME[=WEIGHT], repeatable; default phi4_plus"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML server config (terms, limits)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: KEY=VALUE"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback needs a token"),
    port: int = typer.Option(8000),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer dir: counts tokens and finds the EOS for "
                                                       "/get_reward (OpenRLHF sends text)"),
    token_env: str = typer.Option("REASON_REWARD_TOKEN", help="env var holding the bearer token clients send"),
):
    """Serve rewards over HTTP: OpenRLHF's /get_reward, /score (reward score's records), /health."""
    import os

    from rewards.server import ServeConfig, check_bind, serve

    with user_errors():
        cfg = _reward_config(config, reward, set_, ServeConfig)
        if tokenizer:
            from reason.models import TOKENIZER_FILES, resolve

            cfg.tokenizer = str(resolve(tokenizer, "--tokenizer", TOKENIZER_FILES))
        token = os.environ.get(token_env) or None
        check_bind(host, token)
    serve(cfg, host, port, token)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="reward summary")
    for col in ("source", "n", "mean score", "accuracy", "skipped", "timeouts"):
        table.add_column(col, justify="left" if col == "source" else "right")

    def row(name: str, s: dict) -> None:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(name, str(s["n"]), fmt(s["mean_score"]), fmt(s["accuracy"]),
                      str(s["skipped"]), str(s["timeouts"]))

    for name, s in summary.get("by_source", {}).items():
        row(name, s)
    row("[bold]all[/]", summary)
    console.print(table)


if __name__ == "__main__":
    app()
