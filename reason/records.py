"""Shared record types and their JSONL files: what every stage reads and writes.

Problem, Trace and Rollout are the records every stage reads and writes. JSONL is
the file format: a malformed line is a RecordError naming the file and line, and
writers never leave a half-written file behind (atomic rename) or lose what an
appending run already wrote (line-at-a-time flush).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reason.errors import UserError

Message = dict[str, str]  # {"role": ..., "content": ...}


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(Record):
    """A prompt with an optional verifiable answer."""

    id: str
    prompt: str | list[Message]
    ground_truth: str | None = None
    source: str = "unknown"
    metadata: dict[str, Any] = Field(default_factory=dict)


class Trace(Record):
    """One teacher response to a problem, split into reasoning and answer."""

    problem: Problem
    sample: int = 0  # index among the k samples drawn for this problem
    reasoning: str
    answer: str
    teacher: str
    sampling: dict[str, Any] = Field(default_factory=dict)


class Rollout(Record):
    """One sampled response from the policy, with what the trainer needs."""

    problem: Problem
    completion: str
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)
    finish_reason: Literal["stop", "length"] = "stop"
    rewards: dict[str, float | None] = Field(default_factory=dict)


M = TypeVar("M", bound=BaseModel)


class RecordError(UserError):
    """A bad record: the message starts with `file:line:`."""

    def __init__(self, path: str | Path, line: int, msg: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")  # line 0: the file as a whole


def existing(path: str | Path, key: str) -> Path:
    """`path`, if it exists; else a UserError naming the key (or flag) that gave it."""
    if not Path(path).exists():
        raise UserError(f"{key}: {path}: no such file or directory")
    return Path(path)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<record>"
        parts.append(f"field '{key}': {e['msg']}")
    return "; ".join(parts)


def read_jsonl(path: str | Path, model: type[M] | None = None) -> Iterator[M | dict]:
    """Yield one record per non-empty line, validated against `model` if given.

    >>> next(read_jsonl("problems.jsonl", Problem)).id  # doctest: +SKIP
    'p0'
    """
    return (rec for _, rec in read_numbered(path, model))


def read_numbered(path: str | Path, model: type[M] | None = None) -> Iterator[tuple[int, M | dict]]:
    """read_jsonl with each record's 1-based line, for errors a later check finds in a record."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, 0, "no such file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise RecordError(path, n, f"expected a JSON object, got {type(obj).__name__}")
            if model is None:
                yield n, obj
                continue
            try:
                yield n, model.model_validate(obj)
            except ValidationError as e:
                raise RecordError(path, n, _describe(e)) from None


def _line(rec: BaseModel | dict) -> str:
    if isinstance(rec, BaseModel):
        return rec.model_dump_json() + "\n"
    return json.dumps(rec, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, records) -> int:
    """Write all records atomically: the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(_line(rec))
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def log_beside(out: str | Path) -> Path:
    """Where a stage whose output is rewritten whole keeps its resumable log: pairs.jsonl -> pairs.log.jsonl."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".log.jsonl")


def _whole_lines_length(path: Path, block: int = 1 << 16) -> int:
    """Bytes of `path` up to its last newline, read from the end: a resumed log of many GB costs one block."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


class JsonlAppender:
    """Append records one whole line at a time, for runs that resume.

    A run killed mid-write can leave a torn last line; `open` trims it so the
    resumed run re-does that record instead of failing on it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and (whole := _whole_lines_length(self.path)) < size:
            os.truncate(self.path, whole)  # to 0 when the only line is torn
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, rec: BaseModel | dict) -> None:
        self._f.write(_line(rec))
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
