"""Find rewards by name and combine several with weights.

A reward is a plain function `fn(completion: str, **fields) -> float | dict | None`
(None = skip this sample, e.g. an unusable ground truth; a dict holds components
and must have "score"). Names resolve, in order, to rewards registered in code
with `register`, to the `reason.rewards` entry-point group (the built-ins are
registered there exactly like third-party plugins), or to a `module:function` /
`path/to/file.py:function` string.

>>> combined = combine([RewardTerm(name="accuracy"), RewardTerm(name="repetition", weight=0.1)])
>>> combined("... \\boxed{4}", ground_truth="4")["score"]  # doctest: +SKIP
1.0
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUP = "reason.rewards"
_REGISTERED: dict[str, Callable] = {}


class RewardError(ValueError):
    """A bad reward name or argument, or a reward that raised on a sample."""


class RewardTerm(BaseModel):
    """One weighted reward in a recipe: `{name: phi4_plus, weight: 1.0, args: {...}}`.

    `args` are checked against the reward's signature when the recipe is loaded: a name
    the reward does not take is an error, never swallowed as a problem field.
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_args(self) -> "RewardTerm":
        fn = get_reward(self.name)  # RewardError is a ValueError: pydantic reports it with the key
        takes = accepted_args(fn)
        unknown = sorted(set(self.args) - takes)
        if unknown:
            raise ValueError(f"reward '{self.name}' takes no argument {', '.join(map(repr, unknown))} "
                             f"(it takes: {', '.join(sorted(takes)) or 'none'})")
        return self


def accepted_args(fn: Callable) -> set[str]:
    """The keyword arguments a reward names in its signature (not the completion, not **fields)."""
    params = list(inspect.signature(fn).parameters.values())[1:]  # the first is the completion
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class RewardConfig(BaseModel):
    """The `reward:` block of a recipe: weighted terms, scored with hard timeouts."""

    model_config = ConfigDict(extra="forbid")
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="phi4_plus")])
    workers: int | None = None  # default: one per CPU core
    timeout: float = 10.0  # seconds of wall clock per sample, then the worker is killed


def register(name: str):
    """Decorator: make `fn` available to recipes as `name` in this process."""

    def deco(fn: Callable) -> Callable:
        _REGISTERED[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(set(_REGISTERED) | {ep.name for ep in entry_points(group=GROUP)})


@lru_cache(maxsize=None)
def _load_spec(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward '{spec}': no file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"reason_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward '{spec}': cannot import {target}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RewardError(f"reward '{spec}': {target} has no function '{attr}'") from None


def get_reward(name: str) -> Callable:
    """Resolve a reward name or `module:function` / `file.py:function` spec."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if ":" in name:
        return _load_spec(name)
    eps = entry_points(group=GROUP, name=name)
    if not eps:
        raise RewardError(f"unknown reward '{name}'; known: {', '.join(available())} "
                          "(or give module:function / file.py:function)")
    return next(iter(eps)).load()


def as_components(value: float | dict | None, name: str) -> dict[str, float] | None:
    """Normalise a reward's return value to a dict with a float 'score'."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "score" not in value:
            raise RewardError(f"reward '{name}' returned a dict without 'score': {sorted(value)}")
        return {k: float(v) for k, v in value.items()}
    return {"score": float(value)}


def combine(terms: list[RewardTerm]) -> Callable[..., dict[str, float] | None]:
    """One reward from several: score = sum of weight * score; components kept.

    With a single term its components keep their own names; with several they
    are prefixed `name/`. If any term skips (None), the sample is skipped.
    """
    if not terms:
        raise RewardError("no reward terms given")
    fns = [(t, get_reward(t.name)) for t in terms]

    def combined(completion: str, **fields) -> dict[str, float] | None:
        out: dict[str, float] = {}
        total = 0.0
        for term, fn in fns:
            comps = as_components(fn(completion, **{**fields, **term.args}), term.name)  # a recipe's args win
            if comps is None:
                return None
            total += term.weight * comps["score"]
            out.update(comps if len(fns) == 1 else {f"{term.name}/{k}": v for k, v in comps.items()})
        out["score"] = total
        return out

    return combined
