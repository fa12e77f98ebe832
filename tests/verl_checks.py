"""Checks that run INSIDE the verl venv (see verl_env.py), one per command.

`python tests/verl_checks.py CHECK ARG...` asserts against the real verl 0.9.1
and prints one JSON line of findings for the pytest side (test_verl_bridge.py)
to check as well. Kept apart from the tests because verl cannot be imported in
the project's own venv.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch


def compose(overrides_file: str) -> dict:
    """Compose verl's ppo_trainer with our overrides, validate, and load our reward pieces."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

    from rl.verl_config import compose_verl

    overrides = json.loads(open(overrides_file).read())
    cfg = compose_verl(overrides)
    manager = resolve_reward_manager_cls(cfg)
    fn = get_custom_reward_fn(cfg)
    score = fn(data_source="s", solution_str="<think>\nx\n</think>\n\n\\boxed{2}", ground_truth="2",
               extra_info={}, num_tokens=12, finish_reason="stop")
    return {"config": OmegaConf.to_container(cfg, resolve=False), "manager": manager.__module__ + "." +
            manager.__name__, "score": score}


def dataset(parquet: str, system_prompt: str) -> dict:
    """Load our export through verl's own RLHFDataset and collate a batch."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    from tiny import special_think_tokenizer

    tok = special_think_tokenizer()
    conf = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 2048, "filter_overlong_prompts": True,
                             "return_raw_chat": True, "truncation": "error", "cache_dir": "/tmp/verl-cache"})
    ds = RLHFDataset(data_files=[parquet], tokenizer=tok, config=conf)
    rows = [ds[i] for i in range(len(ds))]
    for r in rows:
        assert r["raw_prompt"][0] == {"role": "system", "content": system_prompt}, r["raw_prompt"][0]
        assert r["raw_prompt"][-1]["role"] == "user"
        assert r["index"] == r["extra_info"]["index"]
    batch = collate_fn(rows)
    return {"n": len(ds), "ground_truths": [r["reward_model"]["ground_truth"] for r in rows],
            "data_sources": [r["data_source"] for r in rows], "ids": [r["extra_info"]["id"] for r in rows],
            "batch_keys": sorted(batch), "users": [r["raw_prompt"][-1]["content"] for r in rows]}


def _batch(tok, texts: list[tuple[str, bool]], budget: int):
    """A DataProto as verl's rollout leaves it: left-padded prompts, right-padded responses."""
    from verl import DataProto

    prompt = tok.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    responses, masks = [], []
    for text, stopped in texts:
        ids = tok.encode(text)[:budget] + ([tok.eos_token_id] if stopped else [])
        ids = ids[:budget]
        responses.append(ids + [tok.pad_token_id] * (budget - len(ids)))
        masks.append([1] * len(ids) + [0] * (budget - len(ids)))
    n = len(texts)
    prompts = torch.tensor([prompt] * n)  # [B, P]
    resp = torch.tensor(responses)  # [B, T]
    attn = torch.cat([torch.ones_like(prompts), torch.tensor(masks)], dim=1)  # [B, P+T]
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": resp, "input_ids": torch.cat([prompts, resp], 1),
                 "attention_mask": attn},
        non_tensors={"data_source": np.array(["synthetic"] * n, dtype=object),
                     "reward_model": np.array([{"style": "rule", "ground_truth": "4"}] * n, dtype=object),
                     "extra_info": np.array([{"index": i} for i in range(n)], dtype=object)},
    ), [sum(m) for m in masks]


def _with_terms(overrides: list[str], terms: list[dict], manager: bool = True) -> list[str]:
    """The same overrides with other reward terms, and optionally verl's stock manager instead of ours."""
    from rl.verl_config import hydra_value

    out = [o for o in overrides if not o.startswith("+reward.custom_reward_function.reward_kwargs=")]
    out.append("+reward.custom_reward_function.reward_kwargs=" + hydra_value({"terms": terms}))
    return out if manager else [o for o in out if not o.startswith("reward.reward_manager.")]


def reward(overrides_file: str) -> dict:
    """Our manager vs verl's naive one on the same hand-built batch with special think tags."""
    from verl.trainer.ppo.reward import load_reward_manager

    from rewards.verl import compute_score
    from rl.verl_config import compose_verl
    from rl.verl_reward import response_text

    overrides = json.loads(open(overrides_file).read())
    from tiny import special_think_tokenizer

    tok = special_think_tokenizer()
    think = "<think>\nadd 2 and 2\n</think>\n\nThe answer is \\boxed{4}"
    texts = [(think, True), (think.replace("{4}", "{5}"), True), ("<think>\nadd 2 and 2, then " * 9, False)]
    data, lengths = _batch(tok, texts, budget=48)
    assert tok.decode(tok.encode("<think>"), skip_special_tokens=True) == ""  # verl's decode would erase it

    def run(overrides: list[str]) -> list[dict]:
        manager = load_reward_manager(compose_verl(overrides), tok)
        return [manager.loop.run_until_complete(manager.run_single(data[i:i + 1])) for i in range(len(data))]

    decoded = [response_text(tok, data.batch["responses"][i][:n].tolist()) for i, n in enumerate(lengths)]
    expected = [compute_score("synthetic", text, "4", {"index": i}, terms=[{"name": "phi4_plus"}],
                              num_tokens=lengths[i], finish_reason="length" if i == 2 else "stop")
                for i, text in enumerate(decoded)]
    try:
        run(_with_terms(overrides, [{"name": "phi4_plus"}], manager=False))
        naive_phi4 = "no error"
    except ValueError as e:
        naive_phi4 = str(e)
    fmt = [{"name": "think_format"}]
    return {"ours": run(overrides), "expected": expected, "lengths": lengths, "decoded": decoded,
            "naive_phi4_plus": naive_phi4,
            "format_ours": [r["reward_score"] for r in run(_with_terms(overrides, fmt))],
            "format_naive": [r["reward_score"] for r in run(_with_terms(overrides, fmt, manager=False))]}


def parity() -> dict:
    """rl.losses against verl.trainer.ppo.core_algos on the same tensors."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos as ca

    from rl import losses

    g = torch.Generator().manual_seed(0)
    G, B, T = 4, 12, 7
    rewards = torch.randint(0, 3, (B,), generator=g).float() - 1.0  # [B], some groups constant
    rewards[:G] = 0.5
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).float()  # [B, T]
    index = np.array([i // G for i in range(B)])
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), mask.sum(-1).long() - 1] = rewards  # outcome reward on the last token
    out = {}
    for scale, norm in (("std", True), ("none", False)):
        theirs, _ = ca.compute_grpo_outcome_advantage(token_rewards, mask, index, 1e-6, norm)
        ours = losses.group_advantages(rewards, G, scale)[:, None] * mask
        out[f"adv_{scale}"] = float((theirs - ours).abs().max())
    adv = losses.group_advantages(rewards, G, "std")[:, None].expand(B, T)  # [B, T]
    logp = torch.randn(B, T, generator=g) * 0.5 - 1.0
    old = logp + (torch.rand(B, T, generator=g) - 0.5)  # log-ratios in [-0.5, 0.5]: no dual-clip
    ref = logp + torch.randn(B, T, generator=g) * 0.3
    for mode in losses.AGG_MODES:
        cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                "clip_ratio_c": 3.0, "global_batch_info": {}})
        theirs, _ = ca.compute_policy_loss_vanilla(old, logp, adv, mask, mode, cfg)
        per_token, _ = losses.policy_loss(logp, old, adv, mask, 0.2, 0.28)
        out[f"pg_{mode}"] = [float(theirs), float(losses.aggregate(per_token, mask, mode))]
    for kind in ("k1", "k2", "k3", "low_var_kl"):
        theirs = ca.kl_penalty(logp, ref, kind)
        out[f"kl_{kind}"] = float((theirs - losses.kl_estimate(logp, ref, kind)).abs().max())
    # Where they differ by design: verl's dual-clip caps a negative-advantage token's loss at 3|A|.
    big = torch.full((1, 1), 5.0).log()
    cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                            "clip_ratio_c": 3.0, "global_batch_info": {}})
    one, neg = torch.ones(1, 1), -torch.ones(1, 1)
    out["dual_clip"] = [float(ca.compute_policy_loss_vanilla(torch.zeros(1, 1), big, neg, one, "token-mean", cfg)[0]),
                        float(losses.policy_loss(big, torch.zeros(1, 1), neg, one)[0].sum())]
    return out


if __name__ == "__main__":
    check, args = sys.argv[1], sys.argv[2:]
    result = {"compose": compose, "dataset": dataset, "reward": reward, "parity": parity}[check](*args)
    print("RESULT " + json.dumps(result, default=str))
