"""`rewards.trl.TRLReward` inside TRL's own GRPOTrainer, and on TRL's input shapes.

One GRPOTrainer step on a tiny model with `phi4_plus` as its reward: the model was
taught to answer one prompt with `\\boxed{9^{9^{9^{9}}}}`, whose check would run for
ages; those checks time out in the killable workers and the step finishes; what TRL
logged for the reward equals `reason reward score` on the same completions.
"""
from __future__ import annotations

import math
import time

import pytest

from components import require
from rewards.registry import RewardTerm
from rewards.score import score_samples
from rewards.trl import TRLReward, completion_text

HANG = "<think>\nbig\n</think>\n\n\\boxed{9^{9^{9^{9}}}}"  # checked against a gold, sympy computes for ages
PHI4 = [RewardTerm(name="phi4_plus", args={"l_max": 16, "l_pos": 8, "l_neg": 4})]


def test_trl_input_shapes_plain_and_conversational():
    reward = TRLReward(PHI4, eos_token_ids=[2], workers=1)
    try:
        text = "<think>\nadd\n</think>\n\n\\boxed{4}"
        plain = reward(prompts=["q", "q"], completions=[text, text], completion_ids=[[5, 6, 2], [5, 6, 7]],
                       ground_truth=["4", "4"], level=[1, 2])
        chat = reward(prompts=[[{"role": "user", "content": "q"}]] * 2,
                      completions=[[{"role": "assistant", "content": text}]] * 2,
                      completion_ids=[[5, 6, 2], [5, 6, 7]], ground_truth=["4", "4"])
    finally:
        reward.close()
    assert plain == chat
    assert plain[0] == pytest.approx(8 / 13) and plain[1] == pytest.approx(8 / 13 * -0.5)  # the second: no EOS
    assert [r["sample"]["finish_reason"] for r in reward.last] == ["stop", "length"]
    assert [r["sample"]["num_tokens"] for r in reward.last] == [3, 3]
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"}]) == "a"


@pytest.mark.slow
def test_one_grpo_trainer_step_with_a_hanging_check(tmp_path):
    require("trl", "trl==1.16.0, the dev extra")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from reason.chat import ChatConfig, render_prompt
    from tiny import save_taught

    questions = [f"What is {i} + 1?" for i in range(3)] + ["What is 9 to the 9 to the 9 to the 9?"]
    answers = [f"<think>\nadd\n</think>\n\n\\boxed{{{i + 1}}}" for i in range(3)] + [HANG]
    model_dir = save_taught(tmp_path / "taught", questions, answers, steps=1000, paired=True, loss_below=0.002)
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatConfig(system_prompt=None)
    rows = [{"prompt": render_prompt(tok, q, chat), "ground_truth": str(i + 1)} for i, q in enumerate(questions)]
    reward = TRLReward(PHI4, eos_token_ids=[tok.eos_token_id], workers=2, timeout=2.0)
    cfg = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=2,
                     max_completion_length=32, temperature=0.1, max_steps=1, learning_rate=1e-4, logging_steps=1, report_to="none",
                     use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, beta=0.0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          reward_funcs=[reward], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    start = time.monotonic()
    try:
        trainer.train()
    finally:
        reward.close()
    assert time.monotonic() - start < 120  # the hung checks were cut at 2 s each
    logged = next(h for h in trainer.state.log_history if f"rewards/{reward.__name__}/mean" in h)
    statuses = [r["status"] for r in reward.last]
    assert len(reward.last) == 8 and statuses.count("timeout") == 2  # the taught prompt's two samples
    hung = [r["sample"]["completion"] for r in reward.last if r["status"] == "timeout"]
    assert all("\\boxed{9^{9^{9^" in text for text in hung), hung  # the taught power tower
    again, _ = score_samples([r["sample"] for r in reward.last], PHI4, workers=2, timeout=2.0)
    assert [r["status"] for r in again] == statuses
    scores = [r["score"] for r in again if r["score"] is not None]
    assert math.isclose(logged[f"rewards/{reward.__name__}/mean"], sum(scores) / len(scores), rel_tol=1e-5)
    assert logged["reason/timeouts"] == 2.0
