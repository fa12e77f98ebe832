"""Terminal output shared by every command: errors that exit cleanly, progress bars.

Bad input must give one clear line naming the file, line or key and a non-zero
exit, never a traceback; `user_errors` turns the project's input errors (reason.errors)
into that, and lets every other exception keep its traceback.
"""
from __future__ import annotations

import contextlib

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from reason.errors import UserError
from rewards.registry import RewardError

console = Console(stderr=True)
INPUT_ERRORS = (UserError, RewardError)  # anything else is a bug and keeps its traceback


@contextlib.contextmanager
def user_errors():
    """Print input errors as `error: ...` and exit with status 2."""
    try:
        yield
    except INPUT_ERRORS as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # paths stay whole
        raise typer.Exit(2) from None


def progress() -> Progress:
    """A progress bar with count, elapsed time and ETA (on stderr, so stdout stays data)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


# ---------------------------------------------------------------- `--plan`: the memory plan of a trainer's recipe

PLAN = typer.Option(False, "--plan", help="print the recipe's GPU memory plan and exit (1: it does not fit)")
DEVICE_MEMORY = typer.Option(None, "--device-memory", help="for --plan: the GPU's memory, e.g. 80GB "
                                                           "(default: the visible GPU's)")
SHAPE = typer.Option(None, "--shape", help="for --plan: phi-4, phi-4-mini, a config.json or a model dir "
                                           "(default: the recipe's model.path)")


def memory_plan(setup, model_path: str, device_memory: str | None, shape: str | None, title: str) -> None:
    """Print the plan (reason.memory); exit 1 with a refusal when it does not fit."""
    from reason import memory

    with user_errors():
        size = memory.device_memory(device_memory)
        model, source = memory.load_shape(shape, model_path)
    if not memory.report(model, setup, size, f"{title} ({source})"):
        raise typer.Exit(1)
