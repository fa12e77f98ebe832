"""Export a recipe's problems as Parquet in verl's RLHFDataset schema.

verl's GRPO trainer (the engine the Phi-4-reasoning-plus run used; arXiv 2504.21318,
section 4) reads one row per prompt:
    data_source   where the problem came from (verl passes it to compute_score)
    prompt        chat messages, with the recipe's system prompt (reason.chat)
    ability       "math"
    reward_model  {style: "rule", ground_truth}
    extra_info    {index, id, split}
The chat messages are built by `reason.chat.build_messages`, so the verl run sees
the same system prompt as the local trainer. A problem without a ground truth
cannot be rewarded: it is dropped and counted, never exported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reason.chat import ChatConfig, build_messages
from reason.errors import UserError
from reason.problems import load_source
from reason.records import Problem


@dataclass
class Export:
    """What `export_verl` wrote, and what it dropped."""

    train: Path
    validation: Path | None
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows written
    dropped_no_answer: dict[str, int] = field(default_factory=dict)  # split -> problems dropped


def problem_row(problem: Problem, index: int, split: str, chat: ChatConfig) -> dict:
    """One RLHFDataset row; `problem` must have a ground truth."""
    return {
        "data_source": problem.source,
        "prompt": build_messages(problem.prompt, chat),
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
        "extra_info": {"index": index, "id": problem.id, "split": split},
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write rows as one Parquet file, atomically (a temp file renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise UserError(f"{path}: no rows to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def export_verl(cfg, out_dir: str | Path) -> Export:
    """Write `train.parquet` (and `validation.parquet`) for a GRPOConfig into out_dir."""
    out_dir = Path(out_dir)
    result = Export(train=out_dir / "train.parquet", validation=None)
    for split, src in (("train", cfg.data.train), ("validation", cfg.data.validation)):
        if src is None:
            continue
        problems = load_source(src, f"data.{split}")
        kept = [p for p in problems if p.ground_truth not in (None, "")]
        if not kept:
            raise UserError(f"data.{split}: none of the {len(problems)} problems has a ground truth to reward")
        path = out_dir / f"{split}.parquet"
        write_rows(path, [problem_row(p, i, split, cfg.chat) for i, p in enumerate(kept)])
        result.rows[split], result.dropped_no_answer[split] = len(kept), len(problems) - len(kept)
        if split == "validation":
            result.validation = path
    return result
