"""Any `reason` reward as a TRL `reward_funcs` callable, scored in killable workers.

TRL's GRPOTrainer calls each reward function with `prompts`, `completions`,
`completion_ids` and every dataset column as keyword lists, and wants one float (or
None, "not applicable") per completion. TRL's own math reward turns math-verify's
timeout off, so one hostile completion can hang a run; this one scores through the
same long-lived pool of killable workers as every `reason` stage (rewards.score), with
token counts from `completion_ids` and the finish reason from whether a completion
ends with an end-of-sequence token (TRL passes no truncation flag to rewards; its
`mask_truncated_completions` uses the same test).

    reward = TRLReward([RewardTerm(name="phi4_plus", args={"l_max": 4096, "l_pos": 3072, "l_neg": 512})],
                       eos_token_ids=[tokenizer.eos_token_id])
    GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=rows_with_a_ground_truth_column, ...)
"""
from __future__ import annotations

from typing import Any, Sequence

from rewards.registry import RewardTerm
from rewards.score import Scorer

TRL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")  # TRL's own, not dataset columns


def completion_text(completion: str | list[dict]) -> str:
    """A plain completion, or the assistant turns of a conversational one, as text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


class TRLReward:
    """A TRL reward function: `reward(prompts=, completions=, completion_ids=, **columns)` -> scores.

    `terms` are weighted reward terms as in a recipe (built-in or plugin names; args are
    checked against each reward's signature). The dataset column `gold_key` is the
    ground truth; the others reach the reward as problem fields. Each term's components
    are logged to TRL as `reason/<component>` means.
    """

    def __init__(self, terms: Sequence[RewardTerm | str], eos_token_ids: Sequence[int] = (), workers: int | None = None,
                 timeout: float = 10.0, think_open: str = "<think>", think_close: str = "</think>",
                 gold_key: str = "ground_truth", name: str | None = None):
        terms = [t if isinstance(t, RewardTerm) else RewardTerm(name=t) for t in terms]
        self.scorer = Scorer(terms, workers, timeout, think_open, think_close)
        self.eos = set(eos_token_ids)
        self.gold_key = gold_key
        self.__name__ = name or "reason_" + "+".join(t.name.rpartition(":")[2] for t in terms)
        self.last: list[dict] = []  # the rows of the last batch scored: samples, statuses, components

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]] | None = None,
                 **kwargs: Any) -> list[float | None]:
        columns = {k: v for k, v in kwargs.items() if k not in TRL_KWARGS}
        samples = []
        for i, completion in enumerate(completions):
            fields = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            gold = fields.pop(self.gold_key, None)
            sample = {**fields, "completion": completion_text(completion),
                      "ground_truth": None if gold is None else str(gold)}
            if completion_ids is not None:
                ids = completion_ids[i]
                sample["num_tokens"] = len(ids)
                if self.eos:
                    sample["finish_reason"] = "stop" if ids and ids[-1] in self.eos else "length"
            samples.append(sample)
        rows, summary = self.scorer.score(samples)
        self.last = [{**row, "sample": sample} for row, sample in zip(rows, samples)]
        log = kwargs.get("log_metric")
        if log is not None:
            self._log_components(rows, log)
        return [row["score"] for row in rows]

    @staticmethod
    def _log_components(rows: list[dict], log) -> None:
        comps = [r["components"] for r in rows if r["components"]]
        for key in sorted({k for c in comps for k in c if k != "score"}):
            values = [c[key] for c in comps if key in c]
            log(f"reason/{key}", sum(values) / len(values))
        log("reason/timeouts", float(sum(r["status"] == "timeout" for r in rows)))

    def close(self) -> None:
        self.scorer.close()
