"""A verl 0.9 reward manager that lets `reason` rewards see what the model wrote.

verl's own managers decode each response with `skip_special_tokens=True`, so a
model whose `<think>`/`</think>` are special tokens (as in Phi-4-reasoning, whose
think tags are repurposed placeholder tokens; docs/recipes.md §1) would reach
the reward with its tags erased, and the format rule of the Phi-4-reasoning-plus
reward (missing think block -> -1.0) would punish every sample. This manager
decodes with special tokens kept, dropping only the end-of-sequence and padding
tokens at the tail, and passes the length-aware reward what it needs: the
response's token count and whether it stopped or ran out of budget.

Select it with (rl.verl_config writes these):
    reward.reward_manager.source=importlib
    reward.reward_manager.name=ReasonRewardManager
    reward.reward_manager.module.path=pkg://rl.verl_reward
Needs verl installed: it is loaded by verl's reward loop, not by `reason`.
"""
from __future__ import annotations

import asyncio

from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase


def finish_reason(ids: list[int], eos_ids: set[int], budget: int) -> str:
    """Return "stop" if the response ended itself (EOS, or a stop string short of the budget), else "length"."""
    if ids and ids[-1] in eos_ids:
        return "stop"
    return "length" if len(ids) >= budget else "stop"


def response_text(tokenizer, ids: list[int]) -> str:
    """Decode a response keeping special tokens (think tags), without its EOS / padding tail."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    end = len(ids)
    while end and ids[end - 1] in drop:
        end -= 1
    return tokenizer.decode(ids[:end], skip_special_tokens=False)


class ReasonRewardManager(RewardManagerBase):
    """Scores one response at a time with the configured `compute_score` (default: rewards.verl)."""

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score)
        if compute_score is None:  # no custom function configured: this project's default reward
            from rewards.verl import compute_score as default_score

            self.compute_score = default_score

    async def run_single(self, data) -> dict:
        item = data[-1:][0]  # multi-sequence outputs are scored on their last sequence, as verl does
        responses = item.batch["responses"]  # [T_resp], right-padded to the rollout budget
        budget = responses.shape[-1]
        n = int(item.batch["attention_mask"][-budget:].sum())
        ids = responses[:n].tolist()
        extra = dict(item.non_tensor_batch.get("extra_info") or {})
        loop = asyncio.get_running_loop()
        kwargs = {
            "data_source": item.non_tensor_batch["data_source"],
            "solution_str": await loop.run_in_executor(None, response_text, self.tokenizer, ids),
            "ground_truth": item.non_tensor_batch["reward_model"]["ground_truth"],
            "extra_info": extra,
            "num_tokens": n,
            "finish_reason": finish_reason(ids, {self.tokenizer.eos_token_id} - {None}, budget),
        }
        result = await loop.run_in_executor(None, lambda: self.compute_score(**kwargs))
        if not isinstance(result, dict):
            result = {"score": float(result)}
        return {"reward_score": result["score"], "reward_extra_info": dict(result)}
