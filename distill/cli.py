"""`reason distill ...`: the distillation-data commands (mounted by `reason/cli.py`).

One command per step of RECIPES.md sections 1 and 3, each a thin shell over a typed
config and a library function; heavy imports happen inside the command.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from reason.console import console, user_errors

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def distill():
    """Distillation data: teacher traces and the datasets made from them."""


# ---------------------------------------------------------------- generate

@app.command("generate")
def generate(
    problems: Path = typer.Option(..., "--problems", "-p", help="problems JSONL (Problem records)"),
    out: Path = typer.Option(..., "--out", "-o", help="traces JSONL; appended to, and resumed from"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML GenerateConfig"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: KEY=VALUE"),
):
    """Sample k teacher traces per problem; a killed run resumes where it stopped."""
    from distill.generate import GenerateConfig, generate_traces
    from distill.teacher import TeacherError
    from reason.config import load_config
    from reason.records import Problem, read_jsonl

    with user_errors():
        cfg = load_config(GenerateConfig, config, set_)
        items = list(read_jsonl(problems, Problem))
        try:
            report = generate_traces(items, out, cfg)
        except TeacherError as e:  # e.g. a bad API key or model name: every request would fail
            console.print(f"[bold red]error:[/] the teacher refused the run: {escape(str(e))}", highlight=False)
            raise typer.Exit(1) from None
    print(json.dumps({**asdict(report), "missing": report.missing}))
    if report.failed:
        console.print(f"[yellow]{report.failed} of {report.total} pairs failed "
                      f"({escape(str(report.failures))}); run the same command again to retry them[/]")


if __name__ == "__main__":
    app()
