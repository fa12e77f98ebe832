"""Where a stage's problems come from: a file (JSONL, Parquet, a saved HF dataset) or the generator.

Every stage that reads problems (eval, GRPO, select, generate, the verl export) names
them with one `ProblemSource` section (a path, or `synthetic: {n, seed, levels}`) and
reads them with `load_source`. Public problem sets (math competitions, NuminaMath-style
collections, GSM8K) name their columns differently: `load_problems` maps the common
names onto `Problem` (prompt, ground truth, id), takes the `\\boxed{}` answer out of full
worked solutions, and fails loudly on a row with no usable field, naming the file, the
line or row, and the names it tried. A dataset directory (`Dataset.save_to_disk`) is
read with pyarrow directly, so the `datasets` package is not needed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field, PositiveInt, model_validator

from reason.config import Section
from reason.records import Problem, RecordError, existing, read_numbered
from rewards.math import extract_answer

# Tried in order; the first present (and not None) wins. Dotted names look inside a
# nested column (verl's parquet keeps the answer in reward_model.ground_truth).
PROMPT_KEYS = ("problem", "question", "prompt", "input", "messages")
ANSWER_KEYS = ("answer", "ground_truth", "final_answer", "target", "reward_model.ground_truth", "solution")
ID_KEYS = ("id", "idx", "unique_id")
SOURCE_KEYS = ("source", "data_source")
FIELDS = ("prompt", "ground_truth", "id")


class RowError(RecordError):
    """A bad row of a table (Parquet, dataset directory): `file: row N: ...`, N from 0."""

    def __init__(self, path: str | Path, row: int, msg: str):
        ValueError.__init__(self, f"{path}: row {row}: {msg}")
        self.path, self.line = str(path), row


def prompt_text(problem: Problem) -> str:
    """The user-visible problem text: the prompt, or its user turns for chat prompts."""
    if isinstance(problem.prompt, str):
        return problem.prompt
    return "\n".join(m.get("content", "") for m in problem.prompt if m.get("role") == "user")


def _get(row: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row


def _first(row: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        v = _get(row, k)
        if v is not None and v != "":
            return k, v
    return None, None


def _as_prompt(value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        msgs = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in value]
        while msgs and msgs[-1]["role"] == "assistant":  # a stored reply is not part of the prompt
            msgs.pop()
        if msgs and all(m["role"] and m["content"] for m in msgs):
            return msgs
    raise ValueError(f"expected text or a list of {{role, content}} messages, got {str(value)[:80]!r}")


def _as_answer(value: Any) -> str:
    """A short gold answer from an answer column or a full worked solution."""
    text = str(value).strip()
    if "\\boxed" in text or "\\fbox" in text:
        boxed = extract_answer(text)
        if boxed is None:
            raise ValueError(f"has \\boxed but no complete \\boxed{{...}} answer: {text[-80:]!r}")
        return boxed
    if "####" in text:  # GSM8K style: worked solution, then "#### 42"
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def _stable_id(prompt: str | list) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return "h" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _keys(fields: dict[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return (fields[name],) if name in fields else default


def row_to_problem(row: dict, fields: dict[str, str] | None = None, source: str | None = None,
                   require_answer: bool = True, fallback_source: str = "unknown") -> Problem:
    """Map one raw row onto a Problem; ValueError says which field is missing or bad.

    `fields` overrides the column tried for "prompt", "ground_truth" or "id" (dotted
    names reach into nested columns). Columns not used go to `metadata`. The source
    is `source` if given, else the row's source/data_source column, else
    `fallback_source`.
    """
    fields = fields or {}
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown keys in fields {sorted(unknown)}; expected some of {list(FIELDS)}")
    used = []
    tries = _keys(fields, "prompt", PROMPT_KEYS)
    key, value = _first(row, tries)
    if key is None:
        raise ValueError(f"no prompt field: tried {', '.join(tries)}; the row has {', '.join(row) or 'nothing'}")
    try:
        prompt = _as_prompt(value)
    except ValueError as e:
        raise ValueError(f"field '{key}': {e}") from None
    used.append(key)

    tries = _keys(fields, "ground_truth", ANSWER_KEYS)
    key, value = _first(row, tries)
    gold = None
    if key is not None:
        try:
            gold = _as_answer(value)
        except ValueError as e:
            raise ValueError(f"field '{key}': {e}") from None
        used.append(key)
    elif require_answer:
        raise ValueError(f"no answer field: tried {', '.join(tries)}; the row has {', '.join(row)}")

    key, value = _first(row, _keys(fields, "id", ID_KEYS))
    pid = str(value) if key is not None else _stable_id(prompt)
    used.append(key)

    skey, svalue = _first(row, SOURCE_KEYS)
    used.append(skey)
    top = {k.split(".")[0] for k in used if k}
    metadata = dict(row.get("metadata") or {}) if isinstance(row.get("metadata"), dict) else {}
    metadata.update({k: v for k, v in row.items() if k not in top and k != "metadata" and v is not None})
    return Problem(id=pid, prompt=prompt, ground_truth=gold, source=source or str(svalue or fallback_source),
                   metadata=metadata)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (registers the submodule)
    except ImportError:
        raise ImportError("reading Parquet or dataset directories needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _arrow_files(path: Path) -> list[Path]:
    """The shards of a `save_to_disk` directory, in the order state.json lists them."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        raise RecordError(path, 0, f"a DatasetDict with splits {splits}: pass one split's folder, "
                                   f"e.g. {path / splits[0]}")
    state = path / "state.json"
    if state.is_file():
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise RecordError(path, 0, "not a saved dataset: no state.json and no .arrow files")
    return files


def _dataset_batches(path: Path) -> Iterator:
    pa = _pyarrow()
    for file in _arrow_files(path):
        with pa.memory_map(str(file)) as src:
            try:  # save_to_disk writes the streaming format; accept the file format too
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(src)
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                yield from reader


def _table_rows(batches: Iterator) -> Iterator[tuple[int, dict]]:
    """(row number from 0, row) over a table's record batches."""
    return enumerate(rec for batch in batches for rec in batch.to_pylist())


def load_problems(path: str | Path, fields: dict[str, str] | None = None, source: str | None = None,
                  *, require_answer: bool = True) -> list[Problem]:
    """Read problems from `.jsonl`, `.parquet`, or a `save_to_disk` dataset directory.

    `source` names where the problems came from; without it a row's own
    `source`/`data_source` column is used, else the file name. A row without a
    prompt (or, with `require_answer`, without an answer) is a RecordError naming
    the file and line (JSONL) or row counted from 0 (tables).
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(path, 0, "no such file or directory")
    if path.is_dir():
        rows, err = _table_rows(_dataset_batches(path)), RowError
    elif path.suffix == ".parquet":
        rows, err = _table_rows(_pyarrow().parquet.ParquetFile(path).iter_batches(batch_size=4096)), RowError
    elif path.suffix in (".jsonl", ".ndjson"):
        rows, err = read_numbered(path), RecordError  # JSON errors are file:line there
    else:
        raise RecordError(path, 0, "unknown format: expected .jsonl, .parquet or a dataset directory")
    fallback = path.stem
    if (path.parent / "dataset_dict.json").is_file():  # one split of a DatasetDict: "gsm8k/test"
        fallback = f"{path.parent.name}/{path.name}"
    out = []
    for where, row in rows:
        try:
            out.append(row_to_problem(row, fields, source, require_answer, fallback_source=fallback))
        except ValueError as e:
            raise err(path, where, str(e)) from None
    return out


class SyntheticSpec(Section):
    """Problems from the built-in generator (reason.synthetic)."""

    n: PositiveInt = 50
    seed: int = 0
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])


class ProblemSource(Section):
    """A stage's problems: `path` (a file or dataset dir) or `synthetic`; a bare string is a path."""

    path: str | None = None
    synthetic: SyntheticSpec | None = None
    fields: dict[str, str] = Field(default_factory=dict)  # column overrides: prompt / ground_truth / id
    limit: PositiveInt | None = None  # keep only the first `limit` problems

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, data):
        return {"path": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_source(self) -> "ProblemSource":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of path (a problems file) and synthetic: {n, seed, levels}")
        if self.path == "synthetic":
            raise ValueError("'synthetic' is not a file; write synthetic: {n: 100, seed: 0, levels: [1, 2]}")
        return self

    def describe(self) -> str:
        if self.synthetic is not None:
            s = self.synthetic
            return f"synthetic(n={s.n}, seed={s.seed}, levels={s.levels})"
        return str(self.path)


def load_source(src: ProblemSource, key: str = "problems") -> list[Problem]:
    """The problems a ProblemSource names (rows without an answer are kept; stages count them).

    `key` is where the source sits in the recipe, for the error when its path is missing.
    """
    if src.synthetic is not None:
        from reason.synthetic import generate_problems

        s = src.synthetic
        problems = generate_problems(s.n, s.seed, tuple(s.levels))
    else:
        problems = load_problems(existing(src.path, key), src.fields or None, require_answer=False)
    return problems[:src.limit] if src.limit else problems
