"""Built-in rewards, the registry (entry points, module:function, file.py:function) and the verl adapter."""
import pytest

from rewards import builtin
from rewards.registry import RewardError, RewardTerm, available, combine, get_reward
from rewards.verl import compute_score

GOOD = "<think>\n2 + 2 is 4.\n</think>\n\nThe answer is \\boxed{4}."
BUILTINS = {"accuracy", "think_format", "phi4_plus", "plus_minus_one", "repetition", "dapo_overlong", "cosine"}


def test_builtins_are_registered_as_entry_points():
    assert BUILTINS <= set(available())
    assert get_reward("phi4_plus") is builtin.phi4_plus


def test_accuracy_and_skip():
    assert builtin.accuracy(GOOD, ground_truth="4") == {"score": 1.0, "acc": 1.0}
    assert builtin.accuracy(GOOD, ground_truth="5")["score"] == 0.0
    assert builtin.accuracy(GOOD, ground_truth="") is None  # unusable gold: skipped, never rewarded
    assert builtin.accuracy(GOOD, ground_truth=None) is None
    # a \boxed{} inside the reasoning is not the answer
    assert builtin.accuracy("<think>\\boxed{4}</think> no idea", ground_truth="4")["score"] == 0.0
    assert builtin.plus_minus_one(GOOD, ground_truth="5")["score"] == -1.0


@pytest.mark.parametrize("completion, gold, n, finish, acc_scaled", [
    (GOOD, "4", 1000, "stop", 1.0),
    (GOOD, "4", 28_672, "stop", 0.75),
    (GOOD, "5", 1_851, "stop", -0.75),
    (GOOD, "5", 5_000, "stop", -0.5),
    (GOOD, "4", 31_744, "length", -0.5),          # truncated overrides correctness
    ("2 + 2 is 4. \\boxed{4}", "4", 10, "stop", -1.0),  # no think block
])
def test_phi4_plus(completion, gold, n, finish, acc_scaled):
    r = builtin.phi4_plus(completion, ground_truth=gold, num_tokens=n, finish_reason=finish)
    assert r["acc_scaled"] == pytest.approx(acc_scaled, abs=1e-9)
    assert r["score"] == pytest.approx(8 / 13 * acc_scaled + 1 / 13 * r["rep"])


def test_phi4_plus_needs_tokens_not_characters():
    with pytest.raises(ValueError, match="num_tokens"):
        builtin.phi4_plus(GOOD, ground_truth="4")


def test_phi4_plus_short_context_override():
    r = builtin.phi4_plus(GOOD, ground_truth="4", num_tokens=150, finish_reason="stop",
                          l_max=200, l_pos=100, l_neg=50)
    assert r["acc_scaled"] == pytest.approx(0.75)


def test_combine_weights_and_prefixes():
    fn = combine([RewardTerm(name="accuracy"), RewardTerm(name="think_format", weight=0.5)])
    r = fn("no think \\boxed{4}", ground_truth="4")
    assert r == {"accuracy/score": 1.0, "accuracy/acc": 1.0, "think_format/score": 0.0, "score": 1.0}
    assert fn(GOOD, ground_truth="") is None


def test_plugins_by_module_and_file(tmp_path):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text("def short(completion, **fields):\n    return 1.0 if len(completion) < 10 else 0.0\n")
    assert get_reward(f"{plugin}:short")("tiny") == 1.0
    assert get_reward("rewards.builtin:accuracy") is builtin.accuracy
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(RewardError, match="no function 'missing'"):
        get_reward(f"{plugin}:missing")


def test_verl_adapter_same_keys_every_sample():
    kw = dict(data_source="synthetic", extra_info={"num_tokens": 100, "finish_reason": "stop"})
    good = compute_score(solution_str=GOOD, ground_truth="4", **kw)
    bad = compute_score(solution_str="garbage", ground_truth="4", **kw)
    skipped = compute_score(solution_str=GOOD, ground_truth="", **kw)
    assert set(good) == set(bad) == set(skipped)
    assert good["score"] == pytest.approx(8 / 13) and good["skipped"] == 0.0
    assert bad["score"] == pytest.approx(-8 / 13)
    assert skipped["score"] == 0.0 and skipped["skipped"] == 1.0
    acc = compute_score(solution_str=GOOD, ground_truth="4", reward="accuracy", **kw)
    assert acc["score"] == 1.0


def test_a_recipe_arg_the_reward_does_not_take_is_an_error_naming_it(tmp_path):
    from reason.config import ConfigError, load_config
    from rl.config import GRPOConfig

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("data: {train: p.jsonl}\nreward:\n  terms:\n    - {name: phi4_plus, args: {lpos: 40}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, recipe)
    msg = str(e.value)
    assert f"{recipe}:4" in msg and "reward 'phi4_plus' takes no argument 'lpos'" in msg and "l_pos" in msg
    cfg = load_config(GRPOConfig, recipe, ["reward.terms=[{name: phi4_plus, args: {l_pos: 40, l_max: 100}}]"])
    assert cfg.reward.terms[0].args == {"l_pos": 40, "l_max": 100}
    # the arg reaches the reward: a correct answer of 70 tokens is past L_pos = 40 now, not at 1.0
    scored = combine(cfg.reward.terms)(GOOD, ground_truth="4", num_tokens=70, finish_reason="stop")
    assert scored["acc_scaled"] == pytest.approx(0.75)  # halfway from L_pos to L_max


def test_problem_fields_still_reach_a_reward(tmp_path):
    plugin = tmp_path / "fields.py"
    plugin.write_text("def by_level(completion, level=0, **_):\n    return float(level)\n")
    term = RewardTerm(name=f"{plugin}:by_level")
    assert combine([term])("x", level=3, ground_truth="1")["score"] == 3.0  # a problem field, not an arg
    with pytest.raises(ValueError, match="takes no argument 'levle'"):
        RewardTerm(name=f"{plugin}:by_level", args={"levle": 2})
