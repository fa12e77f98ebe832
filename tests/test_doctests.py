"""Every example in a library docstring still holds (`>>>` lines are run, as doctest runs them)."""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS_VERL = {"rl.verl_reward"}  # imports verl, which lives in its own venv
MODULES = sorted(f"{p.parent.name}.{p.stem}" for pkg in ("reason", "rewards", "distill", "rl")
                 for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", [m for m in MODULES if m not in NEEDS_VERL])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail"
