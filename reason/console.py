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
