"""The project's one user-error type: bad input, said in one line.

A bad record, config key, flag or path raises `UserError` (or a subclass that names
the file and line, `ConfigError`, `RecordError`); the CLI prints its message and exits
with status 2. Anything else, a shape mismatch or a missing key in a checkpoint, is a
bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input to a command: the message says what and where, in one line."""
