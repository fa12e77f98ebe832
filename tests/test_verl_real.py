"""The verl bridge against the real verl 0.9.1, in its own venv (tests/verl_env.py builds it
once, minutes) through tests/verl_checks.py: our overrides compose and validate, verl's
RLHF dataset loads our Parquet, the reward manager keeps think tags and passes lengths,
and our advantages and losses match verl's core_algos. Under CI=true a venv that cannot
be built is a failure (tests/components.py)."""
import json

import pytest

from components import missing
from reason.chat import PHI4_SYSTEM_PROMPT, TEMPLATES
from rl.verl_config import verl_overrides
from verl_recipe import ARR, _job_dirs_in_tmp_path, make_cfg, recipe, rl_cli  # noqa: F401 (fixtures)



@pytest.fixture(scope="module")
def verl_py():
    from verl_env import VerlEnvError, verl_python

    try:
        return verl_python()
    except VerlEnvError as e:
        missing(f"the verl 0.9.1 venv (it could not be built: {e})")


def verl_check(python, check, *args) -> dict:
    from verl_env import run_in_verl

    r = run_in_verl(python, "tests/verl_checks.py", check, *map(str, args))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def write_overrides(tmp_path, cfg, train="/data/train.parquet", val=None):
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(verl_overrides(cfg, train, val)))
    return path


@pytest.mark.slow
def test_verl_composes_and_validates_our_overrides(verl_py, tmp_path):
    odd = "it's a \\ path\\"
    cfg = make_cfg(chat={"template": "chatml"}, algorithm={"clip_high": 0.28, "dynamic_sampling": True,
                                                           "max_resample_rounds": None, "ratio_level": "sequence"},
                   train={"micro_batch_tokens": 40_000},
                   reward={"terms": [{"name": "phi4_plus", "args": {"w_acc": 0.5}},
                                     {"name": "think_format", "weight": 0.1, "args": {"think_open": odd}}]})
    got = verl_check(verl_py, "compose", write_overrides(tmp_path, cfg))
    c = got["config"]
    assert c["algorithm"]["adv_estimator"] == "grpo" and c["algorithm"]["filter_groups"]["enable"] is True
    assert c[ARR]["rollout"]["n"] == 8 and c[ARR]["actor"]["clip_ratio_high"] == 0.28
    assert c[ARR]["actor"]["policy_loss"]["loss_mode"] == "gspo" and c[ARR]["actor"]["use_dynamic_bsz"] is True
    # the reference's log-prob pass reads the actor's budget (the dump keeps verl's interpolation)
    assert c[ARR]["ref"]["log_prob_max_token_len_per_gpu"] == f"${{oc.select:{ARR}.actor.ppo_max_token_len_per_gpu,16384}}"
    assert c[ARR]["model"]["custom_chat_template"] == TEMPLATES["chatml"]
    crf = c["reward"]["custom_reward_function"]
    assert (crf["path"], crf["name"]) == ("pkg://rewards.verl", "compute_score")
    assert crf["reward_kwargs"]["terms"][1]["args"]["think_open"] == odd
    assert c["reward"]["reward_manager"]["source"] == "importlib"
    assert c["custom_reward_function"] == {"path": None, "name": None}  # the ignored legacy block: untouched
    assert got["manager"] == "rl.verl_reward.ReasonRewardManager"
    assert got["score"]["score"] == pytest.approx(0.5 * 1.0 + 0.1 * 0.0)  # think_open changed: format 0


@pytest.mark.slow
def test_dry_run_composes_with_verl_and_reports_its_rejection(verl_py, recipe):
    path, _ = recipe
    base = ["submit", "-a", "http://127.0.0.1:9", "-c", path, "--engine", "verl", "--dry-run",
            "--set", "train.out_dir=/shared/grpo"]
    ok = rl_cli(*base, python=verl_py)
    assert ok.returncode == 0 and "verl: config composed and validated" in ok.stderr, ok.stderr[-2000:]
    bad = rl_cli(*base, "--set", "cluster.n_gpus_per_node=3", python=verl_py)  # 64 x 8 samples over 3 GPUs
    assert bad.returncode == 2 and "verl rejects the overrides" in bad.stderr and "divisible" in bad.stderr


@pytest.mark.slow
def test_rlhf_dataset_loads_our_parquet(verl_py, tmp_path, recipe):
    path, _ = recipe
    assert rl_cli("export-verl", "-c", path, "-o", tmp_path / "v").returncode == 0
    got = verl_check(verl_py, "dataset", tmp_path / "v" / "train.parquet", PHI4_SYSTEM_PROMPT)
    assert got["n"] == 2 and got["ground_truths"] == ["4", "9"] and got["ids"] == ["p1", "p2"]
    assert got["users"] == ["What is 2 + 2?", "What is 3 * 3?"] and got["data_sources"] == ["toy", "toy"]
    assert {"raw_prompt", "reward_model", "data_source", "extra_info"} <= set(got["batch_keys"])


@pytest.mark.slow
def test_reward_manager_keeps_think_tags_and_passes_length(verl_py, tmp_path):
    got = verl_check(verl_py, "reward", write_overrides(tmp_path, make_cfg()))
    assert got["decoded"][0] == "<think>\nadd 2 and 2\n</think>\n\nThe answer is \\boxed{4}"
    assert [o["reward_extra_info"] for o in got["ours"]] == got["expected"]
    assert [o["reward_score"] for o in got["ours"]] == [e["score"] for e in got["expected"]]
    assert got["ours"][0]["reward_score"] == pytest.approx(8 / 13)  # correct, short, well-formed
    assert got["ours"][2]["reward_extra_info"]["truncated"] == 1.0 and got["lengths"][2] == 48
    assert "needs num_tokens" in got["naive_phi4_plus"]  # verl's stock manager cannot feed the length reward
    assert got["format_ours"] == [1.0, 1.0, 0.0] and got["format_naive"] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_advantages_and_losses_match_verl_core_algos(verl_py):
    got = verl_check(verl_py, "parity")
    assert got["adv_std"] < 1e-5 and got["adv_none"] < 1e-6
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        theirs, ours = got[f"pg_{mode}"]
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), mode
    assert max(got[f"kl_{k}"] for k in ("k1", "k2", "k3", "low_var_kl")) < 1e-5
    assert got["dual_clip"] == [pytest.approx(3.0), pytest.approx(5.0)]  # verl caps at 3|A|; we do not
