"""Length control: Phi-4-plus's length-aware reward shortens correct answers; plain +1/-1 does not.

A tiny model is first fitted (a few seconds of supervised steps) to answer
"What is 2 + 3?" correctly in the `<think> ... </think> \\boxed{5}` format after a
thought of 1 to 12 words, so its correct answers span ~17 to ~42 tokens. Then two
GRPO runs from it, same seed: with `phi4_plus` and a short L_pos (a correct answer
earns 1.0 up to 16 tokens, falling to 0.5 at 40) the mean length of correct answers
must fall clearly below the run with `plus_minus_one`, where every correct answer
earns the same and so length gets no gradient.
"""
import pytest
import torch

from reason.chat import IGNORE_INDEX, ChatConfig, format_response, tokenize_example
from rl.trainer import train_grpo
from test_grpo_learning import metrics_rows, recipe, write_problems
from tiny import tiny_model, tiny_tokenizer

WORDS = "First add the numbers then check the result again and write it down".split()
PROMPT = "What is 2 + 3?"


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory):
    """The tiny model fitted to answer PROMPT with \\boxed{5} after 1..15 words of thought."""
    tok, chat = tiny_tokenizer(), ChatConfig(system_prompt=None)
    examples = [tokenize_example(tok, PROMPT, format_response(" ".join(WORDS[:k]), "\\boxed{5}", chat), chat)
                for k in range(1, len(WORDS) + 1)]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
    model = tiny_model("llama", tok)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(100):
        loss = model(input_ids=ids, labels=labels).loss  # [B, T] -> mean over response tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    out = tmp_path_factory.mktemp("answering")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _correct_len(run_dir) -> tuple[float, float]:
    """Mean length of correct answers at the first step and over the last three."""
    lens = [r["response_len/correct_mean"] for r in metrics_rows(run_dir)]
    return lens[0], sum(lens[-3:]) / 3


def test_length_aware_reward_shortens_correct_answers(tmp_path, answering_model):
    problems = write_problems(tmp_path / "problems.jsonl", n=4, prompt=PROMPT, answer="5")
    common = ["rollout.max_tokens=48", "rollout.temperature=0.8", "train.steps=10", "train.prompts_per_step=2",
              "optim.lr=0.0003"]
    phi4 = train_grpo(recipe(tmp_path / "phi4", answering_model, problems, *common,
                             "reward.terms=[{name: phi4_plus, args: {l_max: 40, l_pos: 16, l_neg: 8}}]"))
    plain = train_grpo(recipe(tmp_path / "pm1", answering_model, problems, *common,
                              "reward.terms=[{name: plus_minus_one}]"))
    phi4_first, phi4_last = _correct_len(phi4.run_dir)
    plain_first, plain_last = _correct_len(plain.run_dir)
    assert phi4_first == plain_first  # same seed, same model: the first step samples the same answers
    assert phi4_last < 0.8 * plain_last and phi4_last < 0.8 * phi4_first, (phi4_first, phi4_last, plain_last)
    assert metrics_rows(phi4.run_dir)[-1]["accuracy"] > 0.8  # shorter, and still right
