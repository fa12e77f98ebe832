"""Typed recipe configs: pydantic models loaded from YAML, with dotted overrides.

Every stage's settings are a `Section` (unknown keys are errors). `load_config`
reads a YAML recipe, applies `--set a.b.c=value` overrides (values parsed as YAML
scalars, so `--set rl.group_size=16` is an int), and validates. Any error names
the key and where it came from: the file and line, or the `--set` that set it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from reason.errors import UserError


class Section(BaseModel):
    """Base of every config block: strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


C = TypeVar("C", bound=BaseModel)


class ConfigError(UserError):
    """A bad config key or value: names the key and the file:line or `--set` that set it."""


def _key_lines(node: yaml.Node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Map each dotted key of a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _key_lines(v, key + ".", out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[f"{prefix}{i}"] = v.start_mark.line + 1
            _key_lines(v, f"{prefix}{i}.", out)
    return out


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Load a YAML mapping and the line of each key, or raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data, _key_lines(node)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as a YAML scalar).

    >>> parse_override("rl.group_size=16")
    (['rl', 'group_size'], 16)
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_dotted(data: dict, keys: list[str], value: Any) -> None:
    """Set `data[k1][k2]...= value`, creating sections; list items by index (`terms.0.weight`)."""
    node: Any = data
    for i, k in enumerate(keys):
        if isinstance(node, list):
            if not (k.isdigit() and int(k) < len(node)):
                raise ConfigError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i + 1])}' is not an item of a "
                                  f"{len(node)}-item list")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i])}' is not a section")
        elif i < len(keys) - 1 and node.get(k) is None:
            node[k] = {}
        if i == len(keys) - 1:
            node[k] = value
        else:
            node = node[k]


def validate(cls: type[C], data: dict, origin: dict[str, str], default: str) -> C:
    """Validate `data` as `cls`; errors name each bad key and where it was set."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            where = _origin_of(key, origin, default)
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: '{key}': {msg}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _origin_of(key: str, origin: dict[str, str], default: str) -> str:
    while key:  # the most specific known prefix of the key
        if key in origin:
            return origin[key]
        key = key.rpartition(".")[0]
    return default


def load_config(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
    """Build a `cls` from a YAML file plus `--set` overrides (later wins)."""
    data, lines = read_yaml(path) if path else ({}, {})
    origin = {k: f"{path}:{n}" for k, n in lines.items()}
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(data, keys, value)
        key = ".".join(keys)
        origin = {k: v for k, v in origin.items() if not k.startswith(key + ".")}  # the file's subtree is gone
        origin[key] = f"--set {text}"
    return validate(cls, data, origin, default=str(path) if path else "config")


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Save the resolved config beside a run's outputs, for reproducibility."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
