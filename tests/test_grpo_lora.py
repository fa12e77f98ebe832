"""LoRA GRPO (model.lora): the merged weights engines get, the adapters-off reference, what trains, and that it learns.

- `merged_state_dict` equals peft's own merge_and_unload, bit for bit, under the base model's
  names, and leaves the adapters in place; `adapters_disabled` gives the base model's logits exactly.
- In a run: no second model is loaded for the KL term, only adapter parameters reach AdamW,
  the base weights never move, and after a step the engine holds exactly the merged policy.
- Learning: LoRA adapts a model that already has modes, so the learning test starts from a
  tiny model taught to answer "It is 7." / "It is seven." / "It is four." / "Not sure." about
  evenly; the reward (test_grpo_learning's digit task) asks for the first. Rank-8 adapters,
  lr 0.01. Over REASON_TEST_SEED=0..4 the mean reward of the first two steps is 0.23-0.36 and of
  the last three 0.88-1.00 (the smallest rise 0.60); the test asks for first < 0.5 and a rise
  of more than 0.4. From the random tiny model instead, adapters on its linear layers left the
  reward flat (0.27 -> 0.32 at lr 0.02): its near-uniform head, frozen, has nothing to choose between.
"""
import copy

import torch

from components import TEST_SEED, require
from test_grpo_learning import metrics_rows, recipe, tiny_dir, write_problems  # noqa: F401 (fixture)

LORA = ["model.lora={r: 8, alpha: 16}", "optim.lr=0.02"]


def _policy(model_dir):
    from reason.chat import ChatConfig
    from reason.models import LoraConfig, ModelConfig, load_model

    lm, _ = load_model(ModelConfig(path=str(model_dir), lora=LoraConfig(r=4)), ChatConfig(system_prompt=None),
                       torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at 0, which would make every merge the base itself
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return lm


def test_merged_state_dict_is_peft_merge_under_base_names(tiny_dir):  # noqa: F811
    require("peft", "peft, the dev extra")
    from reason.models import load_pretrained, merged_state_dict

    lm = _policy(tiny_dir)
    got = merged_state_dict(lm)
    want = copy.deepcopy(lm).merge_and_unload().state_dict()
    assert got.keys() == want.keys() == load_pretrained(tiny_dir).state_dict().keys()
    assert not any("base_layer" in k or "lora_" in k for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    base = load_pretrained(tiny_dir).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], base[q])
    assert any("lora_B" in k for k in lm.state_dict())  # still a peft model: nothing was unloaded


def test_adapters_disabled_is_the_base_model_exactly(tiny_dir):  # noqa: F811
    require("peft", "peft, the dev extra")
    from reason.models import adapters_disabled, load_pretrained

    lm, base = _policy(tiny_dir), load_pretrained(tiny_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with adapters_disabled(lm) as ref:
            assert not ref.training
            off = ref(input_ids=ids).logits
        on = lm(input_ids=ids).logits
    assert lm.training  # restored
    assert torch.equal(off, want) and not torch.allclose(on, want)


def test_lora_run_trains_adapters_only_and_syncs_the_merged_policy(tmp_path, tiny_dir):  # noqa: F811
    require("peft", "peft, the dev extra")
    from reason.models import load_pretrained, merged_state_dict
    from rl.trainer import build_run, grpo_step

    cfg = recipe(tmp_path / "run", tiny_dir, write_problems(tmp_path / "problems.jsonl"), *LORA,
                 "algorithm.kl_beta=0.01", "train.steps=2")
    run = build_run(cfg, tmp_path / "run")
    try:
        assert run.ref is run.lm  # the reference is the policy itself, scored with its adapters off
        in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
        adapters = {id(p) for n, p in run.lm.named_parameters() if "lora_" in n}
        assert in_optimizer == adapters and all(p.requires_grad for n, p in run.lm.named_parameters() if "lora_" in n)
        for step in range(2):  # step 0's B = 0 gives no KL; step 1 measures it
            m, _ = grpo_step(run, step)
        assert m["kl"] > 0 and m["time/sync"] > 0
        merged, engine = merged_state_dict(run.lm), run.engine.model.state_dict()
        want = copy.deepcopy(run.lm).merge_and_unload().state_dict()
        assert engine.keys() == want.keys() and all(torch.equal(engine[k], want[k]) for k in want)
        assert all(torch.equal(merged[k], want[k]) for k in want)
        base = load_pretrained(tiny_dir).state_dict()
        frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for n, p in run.lm.named_parameters() if not p.requires_grad}
        assert frozen and all(torch.equal(p, base[n]) for n, p in frozen.items())
        assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    finally:
        run.rewarding.shutdown(wait=True)
        run.scorer.close()


def test_lora_mean_reward_rises_within_twelve_steps(tmp_path):
    require("peft", "peft, the dev extra")
    from rl.trainer import train_grpo
    from tiny import save_taught

    problems = write_problems(tmp_path / "problems.jsonl")
    model = save_taught(tmp_path / "taught", [f"What is {i} + 3?" for i in range(8)],
                        ["It is 7.", "It is seven.", "It is four.", "Not sure."], seed=TEST_SEED)
    result = train_grpo(recipe(tmp_path / "run", model, problems, *LORA, "optim.lr=0.01"))
    rewards = [r["reward/mean"] for r in metrics_rows(result.run_dir)]
    assert len(rewards) == 12
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    print(f"SEED {TEST_SEED}: lora reward {first:.2f} -> {last:.2f} {[round(r, 2) for r in rewards]}")
    assert first < 0.5 and last > first + 0.4, rewards


def test_lora_export_is_a_plain_merged_model(tmp_path, tiny_dir):  # noqa: F811
    require("peft", "peft, the dev extra")
    from safetensors.torch import load_file

    from rl.trainer import train_grpo

    result = train_grpo(recipe(tmp_path / "run", tiny_dir, write_problems(tmp_path / "problems.jsonl"), *LORA,
                               "train.steps=2"))
    exported = load_file(result.final_dir / "model.safetensors")
    initial = load_file(tiny_dir / "model.safetensors")
    assert exported.keys() == initial.keys()
    assert not all(torch.equal(exported[k], initial[k]) for k in initial)
