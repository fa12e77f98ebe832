"""Concepts that once had several homes and drifted apart, now with one, checked where they meet.

- precision: one rule for every trainer and engine (reason.train.compute_dtype);
- think tags: the chat's tags reach every reward call (GRPO, eval, filters, verl);
- user errors: bad input exits 2 in one line, a bug keeps its traceback.
"""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from reason.chat import ChatConfig, format_response
from reason.config import ConfigError, load_config
from reason.engine import Sample
from reason.records import Problem, Trace
from rewards.registry import RewardTerm
from rewards.score import Scorer

CPU = torch.device("cpu")


# ---------------------------------------------------------------- precision

@pytest.fixture
def no_bf16_units(monkeypatch):
    """This process's CPU as one without AVX512-BF16 or AMX (bf16 matmuls 5-60x slower than fp32)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})


def test_the_precision_rule(no_bf16_units, monkeypatch):
    from reason.train import compute_dtype

    assert compute_dtype("auto", CPU) == torch.float32 and compute_dtype("none", CPU) == torch.float32
    with pytest.raises(ConfigError, match="train.autocast: bfloat16 on a cpu without bf16 matmuls"):
        compute_dtype("bfloat16", CPU)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert compute_dtype("auto", CPU) == compute_dtype("bfloat16", CPU) == torch.bfloat16


def test_grpo_on_a_cpu_without_bf16_units_trains_in_float32_or_refuses_by_key(no_bf16_units, tmp_path):
    from rl.config import GRPOConfig
    from rl.trainer import build_run
    from test_grpo_learning import recipe, write_problems
    from tiny import save_tiny

    model = save_tiny(tmp_path / "tiny")
    problems = write_problems(tmp_path / "p.jsonl", n=2)
    run = build_run(recipe(tmp_path / "a", model, problems, "train.autocast=auto"), tmp_path / "a")
    try:
        assert run.dtype == torch.float32 and next(run.lm.parameters()).dtype == torch.float32
    finally:
        run.scorer.close()
    with pytest.raises(ConfigError, match="train.autocast"):
        build_run(recipe(tmp_path / "b", model, problems, "train.autocast=bfloat16"), tmp_path / "b")
    with pytest.raises(ConfigError, match="model.dtype: GRPO keeps float32 master weights"):
        load_config(GRPOConfig, None, ["data.train=p.jsonl", "model.dtype=bfloat16"])


def test_sft_refuses_bf16_where_it_is_slow_before_loading_anything(no_bf16_units, tmp_path):
    from distill.sft import train_sft
    from test_sft import tiny_config

    with pytest.raises(ConfigError, match="train.autocast"):
        train_sft(tiny_config(tmp_path, train={"autocast": "bfloat16"}))
    with pytest.raises(ConfigError, match="model.dtype"):
        train_sft(tiny_config(tmp_path, model={"dtype": "bfloat16"}))


def test_engines_sample_in_the_rule_s_dtype(no_bf16_units):
    from reason.engine import engine_dtype

    assert engine_dtype("auto") == "float32"
    with pytest.raises(ConfigError, match="dtype: bfloat16"):
        engine_dtype("bfloat16")


# ---------------------------------------------------------------- think tags

CUSTOM = ChatConfig(think_open="<reasoning>", think_close="</reasoning>")
DEFAULT = ChatConfig()
PROBLEM = Problem(id="p", prompt="What is 2 + 2?", ground_truth="4")
# The last one guesses \boxed{5} mid-thought: graded on what follows the reasoning, it is right.
BODIES = [("add two and two", "so \\boxed{4}"), ("two and two make five", "\\boxed{5}"),
          ("maybe \\boxed{5}, no", "\\boxed{4}")]


def texts(chat: ChatConfig) -> list[str]:
    return [format_response(r, a, chat) for r, a in BODIES]


@pytest.fixture(scope="module")
def scorers():
    terms = [RewardTerm(name="phi4_plus", args={"l_max": 100, "l_pos": 50, "l_neg": 10}),
             RewardTerm(name="accuracy", weight=0.5)]
    with Scorer(terms, 1, 20.0, CUSTOM.think_open, CUSTOM.think_close) as custom, \
            Scorer(terms, 1, 20.0) as default:
        yield {"custom": custom, "default": default}


def test_grpo_rewards_with_custom_tags_equal_the_default_tags(scorers):
    from rl.rollout import Group, score_groups

    def scored(kind: str, chat: ChatConfig) -> list[dict]:
        group = Group(PROBLEM, [1], [Sample(t, [1] * 7, None, "stop", 7) for t in texts(chat)])
        score_groups(scorers[kind], [group])
        return group.components

    custom, default = scored("custom", CUSTOM), scored("default", DEFAULT)
    assert custom == default
    assert [c["phi4_plus/format_ok"] for c in custom] == [1.0, 1.0, 1.0]
    assert [c["accuracy/acc"] for c in custom] == [1.0, 0.0, 1.0]


def test_eval_grades_custom_tags_as_the_default_ones(scorers):
    from reason.eval import sample_rows

    def rows(kind: str, chat: ChatConfig) -> list[dict]:
        samples = [[Sample(t, [1] * 7, None, "stop", 7) for t in texts(chat)]]
        return [(r["correct"], r["answer"], r["format_ok"], r["score"])
                for r in sample_rows([PROBLEM], samples, chat, scorers[kind])]

    custom = rows("custom", CUSTOM)
    assert custom == rows("default", DEFAULT)
    assert [r[:3] for r in custom] == [(True, "4", True), (False, "5", True), (True, "4", True)]
    assert custom[0][3] == pytest.approx(8 / 13 + 0.5)  # full length-aware accuracy plus the accuracy term


def test_filters_keep_the_same_traces_with_custom_tags(scorers):
    from distill.filters import filter_format, filter_verified

    traces = [Trace(problem=PROBLEM, sample=i, reasoning=r, answer=a, teacher="t") for i, (r, a) in enumerate(BODIES)]
    for chat, kind in ((CUSTOM, "custom"), (DEFAULT, "default")):
        assert len(filter_format(traces, chat).kept) == 3
        assert [t.sample for t in filter_verified(traces, scorers[kind]).kept] == [0, 2]


def test_verl_adapter_passes_the_recipe_s_tags():
    from rewards.verl import compute_score

    terms = [{"name": "phi4_plus", "args": {"l_max": 100, "l_pos": 50, "l_neg": 10}}]
    kw = dict(extra_info={"num_tokens": 7, "finish_reason": "stop"}, terms=terms)
    custom = [compute_score("s", t, "4", think_open="<reasoning>", think_close="</reasoning>", **kw)
              for t in texts(CUSTOM)]
    default = [compute_score("s", t, "4", **kw) for t in texts(DEFAULT)]
    assert custom == default and [c["format_ok"] for c in custom] == [1.0, 1.0, 1.0]
    untagged = [compute_score("s", t, "4", **kw) for t in texts(CUSTOM)]  # the tags not passed: all -1
    assert [c["acc_scaled"] for c in untagged] == [-1.0, -1.0, -1.0]


# ---------------------------------------------------------------- user errors vs bugs

def test_a_bug_inside_a_training_step_keeps_its_traceback(tmp_path, monkeypatch):
    import distill.sft
    from reason.cli import app
    from reason.config import dump_config
    from test_sft import tiny_config

    def broken(*args, **kwargs):
        raise ValueError("shapes [2, 7] and [2, 8] do not match")

    monkeypatch.setattr(distill.sft, "_train_step", broken)
    dump_config(tiny_config(tmp_path, train={"max_steps": 1}), tmp_path / "sft.yaml")
    result = CliRunner().invoke(app, ["distill", "sft", "-c", str(tmp_path / "sft.yaml")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # not a one-line exit 2
    bad = CliRunner().invoke(app, ["distill", "sft", "-c", str(tmp_path / "sft.yaml"), "--set", "train.batch_size=3"])
    assert bad.exit_code == 2 and "multiple of train.micro_batch" in bad.output
