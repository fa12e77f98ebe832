"""Length control: Phi-4-plus's length-aware reward shortens correct answers; plain +1/-1 does not.

A tiny model is first fitted (supervised, down to the loss floor that the choice of
length leaves) to answer "What is 2 + 3?" correctly in the `<think> ... </think>
\\boxed{5}` format after a thought of 1 to 12 words, so its answers span ~17 to ~42
tokens and, sampled at top_p 0.95, are all right. Then two GRPO runs from it, same
seed: with `phi4_plus` and a short L_pos (a correct answer earns 1.0 up to 8 tokens,
falling to 0.5 at 40) correct answers shrink to the shortest thought; with
`plus_minus_one` every answer earns +1, every group has zero variance, nothing is
learned, and the length only wanders with sampling.

Spread over REASON_TEST_SEED=0..4 (the rollout seeds), on an AVX512-BF16 CPU, as
(first step -> mean of the last three steps) of the mean correct length:
  phi4_plus      31.2->17.3  26.4->17.4  32.3->17.5  27.3->17.3  31.8->17.2  (last/first 0.55-0.66)
  plus_minus_one 31.2->30.5  26.4->28.0  32.3->34.8  27.3->27.7  31.8->28.8  (last/first 0.91-1.08)
phi4_plus's last over plus_minus_one's last: 0.50-0.62. The bounds below (0.8, 0.75,
0.8) leave a wide margin on every seed.
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
    """The tiny model fitted to answer PROMPT with \\boxed{5} after 1..12 words of thought."""
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
    return out


def _correct_len(run_dir) -> tuple[float, float]:
    """Mean length of correct answers at the first step and over the last three."""
    lens = [r["response_len/correct_mean"] for r in metrics_rows(run_dir)]  # every step has correct answers
    return lens[0], sum(lens[-3:]) / 3


def test_length_aware_reward_shortens_correct_answers(tmp_path, answering_model):
    problems = write_problems(tmp_path / "problems.jsonl", n=4, prompt=PROMPT, answer="5")
    common = ["rollout.max_tokens=48", "rollout.temperature=1.0", "rollout.top_p=0.95", "train.steps=12",
              "train.prompts_per_step=2", "optim.lr=0.0001", f"train.seed={SEED}"]
    phi4 = train_grpo(recipe(tmp_path / "phi4", answering_model, problems, *common,
                             "reward.terms=[{name: phi4_plus, args: {l_max: 40, l_pos: 8, l_neg: 8}}]"))
    plain = train_grpo(recipe(tmp_path / "pm1", answering_model, problems, *common,
                              "reward.terms=[{name: plus_minus_one}]"))
    phi4_first, phi4_last = _correct_len(phi4.run_dir)
    plain_first, plain_last = _correct_len(plain.run_dir)
    print(f"SEED {SEED}: phi4 {phi4_first:.1f} -> {phi4_last:.1f}, plain {plain_first:.1f} -> {plain_last:.1f}")
    assert phi4_first == plain_first  # same seed, same model: the first step samples the same answers
    assert phi4_last < 0.8 * phi4_first, (phi4_first, phi4_last)
    assert phi4_last < 0.75 * plain_last, (phi4_last, plain_last)
    assert plain_last > 0.8 * plain_first, (plain_first, plain_last)  # no length signal: no trend
    assert metrics_rows(phi4.run_dir)[-1]["accuracy"] > 0.8  # shorter, and still right
