"""Per-step training metrics: a JSONL file always, TensorBoard and W&B on request.

Shared by every trainer (SFT, DPO, GRPO) so their runs read the same way: one JSON
object per logged step in RUN/metrics.jsonl, `{"step": n, "time": unix, ...}`.
On resume (`resume_step`, the checkpoint's step) the rows after that step are
dropped first, so the file never holds two histories of one step; without a
resume step (None or 0) the file starts empty. Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

from reason.config import Section
from reason.errors import UserError
from reason.records import JsonlAppender, read_jsonl, write_jsonl


class TrackerConfig(Section):
    backends: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    project: str = "reason"  # W&B project
    run_name: str | None = None  # W&B run name / id; default: the run directory's name


class Tracker:
    def __init__(self, run_dir: str | Path, cfg: TrackerConfig | None = None, config: dict | None = None,
                 resume_step: int | None = None, enabled: bool = True):
        cfg = cfg or TrackerConfig()
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        if self.path.exists():
            keep = [r for r in read_jsonl(self.path) if resume_step and r.get("step", 0) <= resume_step]
            write_jsonl(self.path, keep)
        if "jsonl" in cfg.backends:
            self._jsonl = JsonlAppender(self.path)
        if "tensorboard" in cfg.backends:
            self._tb = _tensorboard(Path(run_dir) / "tensorboard")
        if "wandb" in cfg.backends:
            self._wandb = _wandb(cfg, Path(run_dir), config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _number(v) for k, v in metrics.items()}
        if self._jsonl:
            self._jsonl.write({"step": step, "time": round(time.time(), 3), **clean})
        if self._tb:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        for sink, end in ((self._jsonl, "close"), (self._tb, "close"), (self._wandb, "finish")):
            if sink is not None:
                getattr(sink, end)()
        self._jsonl = self._tb = self._wandb = None


def _number(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v  # JSON has no NaN; None says "not a number"


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tracker.backends: 'tensorboard' needs the tensorboard package: "
                        "pip install tensorboard") from None
    return SummaryWriter(str(log_dir))


def _wandb(cfg: TrackerConfig, run_dir: Path, config: dict | None):
    try:
        import wandb
    except ImportError:
        raise UserError("tracker.backends: 'wandb' needs the wandb package: pip install wandb") from None
    name = cfg.run_name or run_dir.resolve().name
    return wandb.init(project=cfg.project, name=name, id=name, resume="allow", dir=str(run_dir),
                      config=json.loads(json.dumps(config or {}, default=str)))
