"""DPO on Pivotal Token Search's single-token pairs (distill/batches.py, distill/dpo.py): the loss by hand
on a tiny model, packed with whole-response pairs, learning, and pairs from another tokenizer refused."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distill.batches import DataConfig, SourceConfig, batch_of, load_datasets
from distill.dpo import DPOConfig, dpo_objective, sequence_logprobs, train_dpo
from distill.pairs import TokenPair
from distill.sft import TokenLogProbs
from reason.chat import ChatConfig, prepare_tokenizer, render_prompt
from reason.records import RecordError, read_jsonl, write_jsonl
from tests.components import TEST_SEED
from tests.test_sft import one_thread  # noqa: F401  (autouse fixture)
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer, write_pairs

CHAT = ChatConfig(system_prompt=None)
QUESTIONS = ["What is 2 + 3?", "What is 12 * 7?", "What is 1 + 1?", "What is 3 * 3?"]
ANSWERS = [("5", "6"), ("84", "48"), ("2", "3"), ("9", "6")]


def token_pairs(tok, n: int = 4) -> list[TokenPair]:
    """The answer's first token after "...\\boxed{": the right digit chosen, a wrong one rejected."""
    prefix = tok.encode("<think>\nadd\n</think>\n\nThe answer is \\boxed{", add_special_tokens=False)
    out = []
    for i in range(n):
        q, (good, bad) = QUESTIONS[i % 4], ANSWERS[i % 4]
        chosen, rejected = tok.encode(good, add_special_tokens=False)[0], tok.encode(bad, add_special_tokens=False)[0]
        prompt = tok.encode(render_prompt(tok, q, CHAT), add_special_tokens=False)
        out.append(TokenPair(problem_id=f"t{i}", prompt_ids=prompt, prefix_ids=prefix, prefix=tok.decode(prefix),
                             chosen_id=chosen, chosen=tok.decode([chosen]), rejected_id=rejected,
                             rejected=tok.decode([rejected]), p_before=0.5, p_after=1.0))
    return out


def last_token_logp(model, context: list[int], token: int) -> float:
    """log p(token | context) straight from the model's logits."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([context])).logits[0, -1], -1)[token].item()


def test_single_token_dpo_loss_equals_a_hand_computation(tmp_path):
    tok = prepare_tokenizer(tiny_tokenizer(), CHAT)
    # float64: `whole` sums hundreds of token log-probs in another packing, where float32 rounding alone
    # moves the loss by ~1e-5 relative
    policy, ref = (tiny_model("llama", tok, seed=s).double().eval() for s in (0, 1))
    pairs = token_pairs(tok)
    write_jsonl(tmp_path / "pts.jsonl", pairs)
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path / "pts.jsonl")),
                            SourceConfig(path=write_pairs(tmp_path / "pairs.jsonl", 2))],
                     max_len=512, eval_fraction=0.0)
    train, _ = load_datasets(cfg, tok, CHAT, "dpo")
    assert train.sources == [0, 0, 0, 0, 1, 1]
    for item, pair in zip(train.items, pairs):  # one target each: the pair's token after prompt + prefix
        assert [sum(t != -100 for t in ex.labels) for ex in item] == [1, 1]
        assert item[0].input_ids == pair.prompt_ids + pair.prefix_ids + [pair.chosen_id]
    beta = 0.7
    batch = batch_of(train, [[0, 4, 1], [2, 3, 5]])  # token pairs packed with whole-response pairs
    loss, sums = dpo_objective(TokenLogProbs(ref), beta).loss(TokenLogProbs(policy), batch, 2)
    want, order = 0.0, [0, 4, 1, 2, 3, 5]
    seq = sequence_logprobs(TokenLogProbs(policy), batch).tolist()
    for k, i in enumerate(order):
        if i >= 4:
            continue
        p = pairs[i]
        context = p.prompt_ids + p.prefix_ids
        pc, pr = last_token_logp(policy, context, p.chosen_id), last_token_logp(policy, context, p.rejected_id)
        rc, rr = last_token_logp(ref, context, p.chosen_id), last_token_logp(ref, context, p.rejected_id)
        assert seq[2 * k] == pytest.approx(pc, abs=1e-9) and seq[2 * k + 1] == pytest.approx(pr, abs=1e-9)
        margin = beta * ((pc - rc) - (pr - rr))
        want += math.log1p(math.exp(-margin))  # -log sigmoid(margin)
    whole = dpo_objective(TokenLogProbs(ref), beta).loss(TokenLogProbs(policy), batch_of(train, [[4], [5]]), 2)[0]
    assert loss.item() == pytest.approx(want + whole.item(), rel=1e-9)
    assert sums["pairs"].item() == 6


def _recipe(tmp_path: Path, **data) -> DPOConfig:
    save_tiny(tmp_path / "sft-model", "llama", seed=TEST_SEED)
    tok = tiny_tokenizer()
    write_jsonl(tmp_path / "pts.jsonl", token_pairs(tok, 8))
    pts = {"path": str(tmp_path / "pts.jsonl")}
    return DPOConfig.model_validate({
        "model": {"path": str(tmp_path / "sft-model")}, "chat": {"system_prompt": None},
        "data": {"train": [pts, {"path": write_pairs(tmp_path / "pairs.jsonl", 8), "weight": 0.5}],
                 "eval": [pts], "max_len": 512, "packing": False, **data},
        "dpo": {"beta": 0.5}, "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 4, "micro_batch": 2, "epochs": 3,
                  "autocast": "none", "save_every": 0, "seed": TEST_SEED},
    })


def test_a_few_steps_raise_the_chosen_token_over_the_rejected(tmp_path):
    """Over REASON_TEST_SEED=0..4, after 9 steps (8 token pairs + 4 whole-response pairs an epoch, 3 epochs):
    eval margin 0 -> 1.72..2.00 (bound 1.0), every pair's log p(chosen) - log p(rejected) up by 2.99..4.50
    (bound 0.5)."""
    from transformers import AutoModelForCausalLM

    cfg = _recipe(tmp_path)
    result = train_dpo(cfg)
    rows = list(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    last = rows[-1]
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "sft-model").eval()
    after = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    gains = []
    for p in read_jsonl(tmp_path / "pts.jsonl", TokenPair):
        context = p.prompt_ids + p.prefix_ids
        gap = [last_token_logp(m, context, p.chosen_id) - last_token_logp(m, context, p.rejected_id)
               for m in (before, after)]
        gains.append(gap[1] - gap[0])
    print(f"SEED {TEST_SEED}: steps {result.step}, eval margin {last['eval/margin']:.2f}, "
          f"gains {min(gains):.2f}..{max(gains):.2f}")
    assert last["eval/margin"] > 1.0 and last["eval/accuracy"] == 1.0
    assert min(gains) > 0.5


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = train_dpo(_recipe(tmp_path / "a"))
    cut = _recipe(tmp_path / "b")
    cut.train.stop_after, cut.train.save_every = 2, 2
    assert train_dpo(cut).final_dir is None
    cut.train.stop_after = None
    resumed = train_dpo(cut)
    assert resumed.step == whole.step and resumed.final_dir is not None
    a = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert a[-1]["eval/loss"] == pytest.approx(b[-1]["eval/loss"], rel=1e-6)


def test_pairs_from_another_tokenizer_are_refused_by_file_and_line(tmp_path):
    tok = prepare_tokenizer(tiny_tokenizer(), CHAT)
    pairs = token_pairs(tok, 3)
    pairs[1] = pairs[1].model_copy(update={"chosen": "7"})  # the id no longer decodes to the text
    path = tmp_path / "pts.jsonl"
    path.write_text(pairs[0].model_dump_json() + "\n\n" + pairs[1].model_dump_json() + "\n")
    cfg = DataConfig(train=[SourceConfig(path=str(path))], max_len=512)
    with pytest.raises(RecordError, match=f"{path}:3: chosen_id .* decodes to '84' with this tokenizer, not '7'"):
        load_datasets(cfg, tok, CHAT, "dpo")
    write_jsonl(path, [pairs[0].model_copy(update={"rejected_id": 10**6})])
    with pytest.raises(RecordError, match=f"{path}:1: token id 1000000 is outside"):
        load_datasets(cfg, tok, CHAT, "dpo")
