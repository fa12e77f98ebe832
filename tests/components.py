"""Real components the tests need (vLLM, Ray, TRL, verl): present, or a clear verdict.

On a developer's machine a missing component skips its tests, saying why. Under
`CI=true` it fails them: CI installs every real component, so a missing one means the
suite did not test what it claims to.
"""
from __future__ import annotations

import importlib
import os

import pytest


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip, or under CI fail, because `what` is missing."""
    if ci():
        pytest.fail(f"{what} is missing, and CI=true: the suite must run the real component", pytrace=False)
    pytest.skip(what + " is missing")


def require(module: str, install: str):
    """Import `module`, or skip (fail under CI) naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} ({install})")


# The seed a learning test runs with. A fresh machine may have another CPU, whose floating
# point differs; the spread of a learning test's effect over REASON_TEST_SEED=0..4 stands in
# for that, and each learning test's docstring records it.
TEST_SEED = int(os.environ.get("REASON_TEST_SEED", "0"))
