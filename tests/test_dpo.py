"""DPO (distill/dpo.py): the loss formula by hand, pair log-probs, and learning on a tiny model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.batches import DataConfig, SourceConfig, batch_of, load_datasets
from distill.dpo import DPOConfig, dpo_loss, sequence_logprobs, train_dpo
from distill.sft import TokenLogProbs
from reason.chat import ChatConfig, prepare_tokenizer
from reason.config import load_config
from reason.records import read_jsonl
from tests.components import TEST_SEED
from tests.test_sft import one_thread  # noqa: F401  (autouse fixture)
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer, write_pairs

CHAT = ChatConfig(system_prompt=None)


def test_dpo_loss_by_hand():
    loss, rc, rr = dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0]),
                            torch.tensor([-11.0, -6.0]), torch.tensor([-11.0, -4.0]), beta=0.5)
    # pair 1: r_c = 0.5 * (-10 + 11) = 0.5, r_r = 0.5 * (-12 + 11) = -0.5 -> -log sigmoid(1)
    # pair 2: r_c = 0.5 * (-5 + 6) = 0.5,   r_r = 0.5 * (-5 + 4) = -0.5   -> -log sigmoid(1)
    assert rc.tolist() == [0.5, 0.5] and rr.tolist() == [-0.5, -0.5]
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1.0))] * 2)
    same, _, _ = dpo_loss(torch.tensor([-3.0]), torch.tensor([-7.0]), torch.tensor([-3.0]), torch.tensor([-7.0]), 0.1)
    assert same.item() == pytest.approx(math.log(2))  # policy == reference: no preference yet


def test_pair_logprobs_match_each_sequence_alone(tmp_path):
    tok = prepare_tokenizer(tiny_tokenizer(), CHAT)
    model = tiny_model("qwen2", tok).eval()
    cfg = DataConfig(train=[SourceConfig(path=write_pairs(tmp_path / "pairs.jsonl", 4))], max_len=512,
                     eval_fraction=0.0)
    train, _ = load_datasets(cfg, tok, CHAT, "dpo")
    module = TokenLogProbs(model)
    with torch.no_grad():
        packed = sequence_logprobs(module, batch_of(train, [[0, 1], [2, 3]]))  # [8]: c0 r0 c1 r1 c2 r2 c3 r3
        for k, item in enumerate(train.items[:4]):
            for j, ex in enumerate(item):
                ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)  # [T-1, V]
                keep = labels[0, 1:] != -100
                want = logp[keep].gather(1, labels[0, 1:][keep][:, None]).sum()
                assert packed[2 * k + j].item() == pytest.approx(want.item(), rel=1e-6)


def _dpo_config(tmp_path) -> DPOConfig:
    save_tiny(tmp_path / "sft-model", "llama", seed=TEST_SEED)
    pairs = {"path": write_pairs(tmp_path / "pairs.jsonl", 24)}
    return DPOConfig.model_validate({
        "model": {"path": str(tmp_path / "sft-model")},
        "chat": {"system_prompt": None},
        # eval on the training pairs: a random 2-layer model can fit its pairs, not learn arithmetic
        "data": {"train": [pairs], "eval": [pairs], "max_len": 512},
        "dpo": {"beta": 0.5},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 2, "micro_batch": 1, "epochs": 8,
                  "autocast": "none", "save_every": 0, "seed": TEST_SEED},
    })


@pytest.mark.slow
def test_dpo_learns_the_preference(tmp_path):
    """Over REASON_TEST_SEED=0..4, after 8 epochs: held-out loss 0.011-0.214 (bound 0.347), margin
    4.4-6.7 (bound 1.0), preference accuracy 0.92-1.00 (bound 0.75)."""
    result = train_dpo(_dpo_config(tmp_path))
    rows = list(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == frozen reference
    assert rows[0]["eval/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # first step's forward: before any update
    last = rows[-1]
    print(f"SEED {TEST_SEED}: dpo eval loss {last['eval/loss']:.3f} margin {last['eval/margin']:.2f} "
          f"accuracy {last['eval/accuracy']:.2f}")
    assert last["eval/loss"] < 0.5 * math.log(2)
    assert last["eval/margin"] > 1.0 and last["eval/accuracy"] >= 0.75
    late = rows[-4:]  # training batches differ step to step: compare a few, not one
    assert sum(r["loss"] for r in late) / 4 < rows[1]["loss"] and sum(r["margin"] for r in late) / 4 > rows[1]["margin"]
    assert result.final_dir is not None and (result.final_dir / "model.safetensors").is_file()


def test_stage3_recipe_loads():
    root = Path(__file__).resolve().parents[1] / "configs" / "phi4-mini"
    cfg = load_config(DPOConfig, root / "stage3-dpo.yaml")
    assert (cfg.optim.lr, cfg.data.max_len, cfg.train.epochs, cfg.data.packing) == (5e-7, 16384, 1, False)
    assert cfg.dpo.reference is None  # the SFT model itself
