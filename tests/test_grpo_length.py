"""Length control: Phi-4-plus's length-aware reward drives correct answers to the shortest thought.

A tiny model is first fitted (supervised, down to the loss floor that the choice of
length leaves) to answer "What is 2 + 3?" correctly in the `<think> ... </think>
\\boxed{5}` format after a thought of 1 to 12 words, so its answers span 17 to ~42
tokens and, sampled at top_p 0.95, are nearly all right. Then two GRPO runs from it,
same seed: with `phi4_plus` and a short L_pos (a correct answer earns 1.0 up to 8
tokens, falling to 0.5 at 40) correct answers shrink to the shortest thought (17
tokens); with `plus_minus_one` a correct answer earns +1 at any length. The plain
run is not length-blind: a sample that rambles past rollout.max_tokens is cut, wrong,
and scored -1, which shortens it on some seeds, but never to the shortest thought.

Spread over REASON_TEST_SEED=0..7 (the rollout seeds), as (first step -> mean of the
last three steps) of the mean correct length, on a 2-core AMD EPYC (AVX2 +
AVX512-BF16, no AMX), 2026-12-02:
  phi4_plus      31.2->17.2  26.4->17.2  32.8->17.4  26.9->17.3  32.2->17.1  33.2->17.1  31.4->17.1  30.4->17.1
  plus_minus_one 31.2->23.3  26.4->31.7  32.8->34.4  26.9->22.7  32.2->21.6  33.2->26.8  31.4->29.7  30.4->33.4
and seeds 0..4 on an Intel Xeon with AMX: phi4_plus 17.2-17.5, plus_minus_one 27.7-34.8.
Above the 17-token floor, phi4_plus ends 0.1-0.5 tokens, plus_minus_one 4.6-17.8: the
bound below (a quarter) leaves a wide margin on every seed and both CPUs.
"""
import os

import pytest
import torch

from reason.chat import IGNORE_INDEX, ChatConfig, format_response, tokenize_example
from rl.trainer import train_grpo
from test_grpo_learning import metrics_rows, recipe, write_problems
from tiny import tiny_model, tiny_tokenizer

WORDS = "First add the numbers then check the result again and write it down".split()
PROMPT = "What is 2 + 3?"
SEED = int(os.environ.get("REASON_TEST_SEED", "0"))


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory):
    """The tiny model fitted to answer PROMPT with \\boxed{5} after 1..12 words of thought, and the length of its
    shortest answer (response tokens, EOS included)."""
    tok, chat = tiny_tokenizer(), ChatConfig(system_prompt=None)
    examples = [tokenize_example(tok, PROMPT, format_response(" ".join(WORDS[:k]), "\\boxed{5}", chat), chat)
                for k in range(1, len(WORDS) + 1)]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
    model = tiny_model("llama", tok, seed=0)  # an init that fits in a few hundred steps; SEED varies the rollouts
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(1500):  # to the floor the stopping choice leaves (~0.085): how long that takes varies by CPU
        loss = model(input_ids=ids, labels=labels).loss  # mean over response tokens
        if loss.item() < 0.09:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.09
    out = tmp_path_factory.mktemp("answering")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, int((labels != IGNORE_INDEX).sum(1).min())


def _correct_len(run_dir) -> tuple[float, float]:
    """Mean length of correct answers at the first step and over the last three."""
    lens = [r["response_len/correct_mean"] for r in metrics_rows(run_dir)]  # every step has correct answers
    return lens[0], sum(lens[-3:]) / 3


def test_length_aware_reward_shortens_correct_answers(tmp_path, answering_model):
    model, shortest = answering_model
    problems = write_problems(tmp_path / "problems.jsonl", n=4, prompt=PROMPT, answer="5")
    common = ["rollout.max_tokens=48", "rollout.temperature=1.0", "rollout.top_p=0.95", "train.steps=12",
              "train.prompts_per_step=2", "optim.lr=0.0001", f"train.seed={SEED}"]
    phi4 = train_grpo(recipe(tmp_path / "phi4", model, problems, *common,
                             "reward.terms=[{name: phi4_plus, args: {l_max: 40, l_pos: 8, l_neg: 8}}]"))
    plain = train_grpo(recipe(tmp_path / "pm1", model, problems, *common,
                              "reward.terms=[{name: plus_minus_one}]"))
    phi4_first, phi4_last = _correct_len(phi4.run_dir)
    plain_first, plain_last = _correct_len(plain.run_dir)
    print(f"SEED {SEED}: phi4 {phi4_first:.1f} -> {phi4_last:.1f}, plain {plain_first:.1f} -> {plain_last:.1f}")
    assert phi4_first == plain_first  # same seed, same model: the first step samples the same answers
    assert phi4_last < 0.8 * phi4_first, (phi4_first, phi4_last)
    assert phi4_last - shortest < 0.25 * (plain_last - shortest), (shortest, phi4_last, plain_last)
    assert metrics_rows(phi4.run_dir)[-1]["accuracy"] > 0.8  # shorter, and still right
