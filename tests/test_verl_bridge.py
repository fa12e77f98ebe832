"""The verl bridge in the project's venv: every recipe key mapped, refused or local-only,
recipe -> Hydra overrides, Parquet export, job staging. Against the real verl: test_verl_real.py.
"""
import json
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
import yaml

from reason.chat import PHI4_SYSTEM_PROMPT, TEMPLATES
from reason.config import ConfigError
from rl.config import GRPOConfig
from rl.jobs import JOB_DIR, _shell_arg, submit_grpo
from rl.verl_config import (LEGACY_PREFIXES, check_no_legacy_keys, hydra_value, verl_overrides,
                            verl_settings)

from verl_recipe import ARR, _job_dirs_in_tmp_path, make_cfg, recipe, rl_cli  # noqa: F401 (fixtures)


# ---------------------------------------------------------------- every recipe key: mapped, refused or local-only

def recipe_keys(cls=GRPOConfig, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the recipe schema (a section is walked; a list, an optional section or a
    problem source is one key), with its field info."""
    from pydantic import BaseModel

    from rl.verl_config import LOCAL_ONLY

    out = {}
    for name, field in cls.model_fields.items():
        key = prefix + name
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and key not in LOCAL_ONLY:
            out.update(recipe_keys(sub, key + "."))
        else:
            out[key] = field
    return out


ALTERNATIVES = {  # keys whose other values are not found by type alone
    "train.log_samples_every": [0],
    "algorithm.clip_high": [0.4],
    "algorithm.max_resample_rounds": [4],
    "algorithm.pass_rate_band": [[0.1, 0.6]],
    "rollout.anneal_to": [0.6],
    "train.stop_after": [3],
    "model.max_position_embeddings": [4096],
    "model.lora": [{}],
    "reward.workers": [3],
    "reward.terms": [[{"name": "accuracy"}]],
    "tracker.backends": [["tensorboard"]],
    "tracker.run_name": ["run-x"],
    "optim.betas": [[0.8, 0.9]],
    "train.micro_batch_tokens": [40_960],
}
CONTEXT = {"algorithm.max_resample_rounds": {"algorithm": {"dynamic_sampling": True, "max_resample_rounds": None}},
           "algorithm.dynamic_sampling": {"algorithm": {"max_resample_rounds": None}}}


def alternatives(key: str, value, field) -> list:
    import typing

    if key in ALTERNATIVES:
        return ALTERNATIVES[key]
    choices = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        return [c for c in choices if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value * 0.5 if value else 0.1]
    if isinstance(value, str):
        return [f"/{value.strip('/')}-other" if "/" in value else value + "x"]
    raise AssertionError(f"{key}: add its other values to ALTERNATIVES")


def test_every_recipe_key_is_mapped_refused_or_local_only():
    from reason.config import set_dotted
    from rl.verl_config import LOCAL_ONLY

    base = make_cfg()
    verdicts = {}
    for key, field in recipe_keys().items():
        if key in LOCAL_ONLY:
            assert LOCAL_ONLY[key], key
            verdicts[key] = "local-only"
            continue
        value = base
        for part in key.split("."):
            value = getattr(value, part)
        context = base.model_dump(mode="json")
        for section, values in CONTEXT.get(key, {}).items():
            context[section].update(values)
        want = verl_settings(GRPOConfig.model_validate(context), "/d/t.parquet", None)
        for alt in alternatives(key, value, field):
            data = GRPOConfig.model_validate(context).model_dump(mode="json")
            set_dotted(data, key.split("."), alt)
            try:
                got = verl_settings(GRPOConfig.model_validate(data), "/d/t.parquet", None)
            except ValueError as e:  # ConfigError from verl_settings, ValidationError from the recipe
                assert key in str(e), (key, alt, str(e)[:300])
                verdicts[key] = "refused"
                break
            if got != want:
                verdicts[key] = "mapped"
                break
        assert key in verdicts, f"{key}: changing it changes nothing verl runs, and nothing refuses it"
    assert {"train.keep_checkpoints", "reward.timeout", "tracker.backends", "tracker.project",
            "train.resume"} <= {k for k, v in verdicts.items() if v == "mapped"}
    assert {"train.stop_after", "algorithm.max_resample_rounds", "rollout.anneal_to"} <= \
        {k for k, v in verdicts.items() if v == "refused"}


def test_relative_paths_are_refused_for_verl_and_hub_ids_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="train.out_dir: 'runs/phi4-reasoning-plus' is relative"):
        verl_settings(make_cfg(train={"out_dir": "runs/phi4-reasoning-plus"}), "/d/t.parquet", None)
    with pytest.raises(ConfigError, match="model.path: 'runs/phi4-reasoning-sft/final' is relative"):
        verl_settings(make_cfg(model={"path": "runs/phi4-reasoning-sft/final"}), "/d/t.parquet", None)
    s = verl_settings(make_cfg(model={"path": "microsoft/Phi-4-reasoning"}), "/d/t.parquet", None)
    assert s[f"{ARR}.model.path"] == "microsoft/Phi-4-reasoning"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()  # a local directory shaped like a hub id is a path
    with pytest.raises(ConfigError, match="model.path: 'org/model' is relative"):
        verl_settings(make_cfg(model={"path": "org/model"}), "/d/t.parquet", None)


def test_every_recipe_knob_reaches_verl():
    cfg = make_cfg(
        model={"path": "/m", "gradient_checkpointing": True},
        rollout={"group_size": 16, "temperature": 0.8, "top_p": 0.95, "max_tokens": 4096,
                 "max_prompt_tokens": 512, "gpu_memory_utilization": 0.6},
        algorithm={"adv_scale": "none", "clip_low": 0.2, "clip_high": 0.28, "loss_agg": "seq-mean-token-sum-norm",
                   "kl_beta": 0.0, "kl_type": "k3", "entropy_gamma": 0.0, "epochs": 2, "tis_cap": None,
                   "dynamic_sampling": True, "max_resample_rounds": None},
        optim={"lr": 1e-6, "warmup_steps": 5, "schedule": "cosine", "weight_decay": 0.1,
               "max_grad_norm": 0.5, "betas": [0.9, 0.95]},
        train={"steps": 7, "prompts_per_step": 32, "micro_batch": 4, "seed": 3, "out_dir": "/ckpt",
               "save_every": 5, "log_samples_every": 0, "autocast": "bfloat16", "keep_checkpoints": 3},
        reward={"terms": [{"name": "accuracy", "weight": 2.0}], "workers": 3},
        chat={"template": "phi4"},
        cluster={"nnodes": 2, "n_gpus_per_node": 4, "tensor_parallel": 2},
        tracker={"backends": ["jsonl", "wandb"], "project": "p1"},
    )
    s = verl_settings(cfg, "/d/train.parquet", "/d/val.parquet", "exp1")
    expected = {
        "algorithm.adv_estimator": "grpo", "algorithm.norm_adv_by_std_in_grpo": False,
        "algorithm.filter_groups.enable": True, "algorithm.rollout_correction.rollout_is": None,
        "data.train_files": "/d/train.parquet", "data.val_files": "/d/val.parquet",
        "data.train_batch_size": 32, "data.max_prompt_length": 512, "data.max_response_length": 4096,
        f"{ARR}.model.path": "/m", f"{ARR}.model.enable_gradient_checkpointing": True,
        f"{ARR}.actor.fsdp_config.dtype": "bfloat16", f"{ARR}.rollout.dtype": "bfloat16",
        f"{ARR}.rollout.n": 16, f"{ARR}.rollout.temperature": 0.8, f"{ARR}.rollout.top_p": 0.95,
        f"{ARR}.rollout.gpu_memory_utilization": 0.6, f"{ARR}.rollout.tensor_model_parallel_size": 2,
        f"{ARR}.rollout.seed": 3, f"{ARR}.actor.clip_ratio_low": 0.2, f"{ARR}.actor.clip_ratio_high": 0.28,
        f"{ARR}.actor.loss_agg_mode": "seq-mean-token-sum-norm", f"{ARR}.actor.use_kl_loss": False,
        f"{ARR}.actor.kl_loss_type": "k3", f"{ARR}.actor.entropy_coeff": 0.0, f"{ARR}.actor.ppo_epochs": 2,
        f"{ARR}.actor.ppo_mini_batch_size": 32, f"{ARR}.actor.ppo_micro_batch_size_per_gpu": 4,
        f"{ARR}.actor.optim.lr": 1e-6, f"{ARR}.actor.optim.lr_warmup_steps": 5,
        f"{ARR}.actor.optim.lr_scheduler_type": "cosine", f"{ARR}.actor.optim.weight_decay": 0.1,
        f"{ARR}.actor.optim.clip_grad": 0.5, f"{ARR}.actor.optim.betas": [0.9, 0.95],
        f"{ARR}.model.custom_chat_template": TEMPLATES["phi4"],
        "reward.custom_reward_function.reward_kwargs": {"terms": [{"name": "accuracy", "weight": 2.0, "args": {}}],
                                                        "think_open": "<think>", "think_close": "</think>",
                                                        "timeout": 10.0},
        "reward.num_workers": 3, "trainer.nnodes": 2, "trainer.n_gpus_per_node": 4,
        "trainer.logger": ["console", "file", "wandb"], "trainer.project_name": "p1",
        "trainer.total_training_steps": 7, "trainer.save_freq": 5, "trainer.max_actor_ckpt_to_keep": 3,
        "trainer.default_local_dir": "/ckpt", "trainer.experiment_name": "exp1", "trainer.rollout_data_dir": None,
        "trainer.val_before_train": True,
    }
    assert {k: s[k] for k in expected} == expected


def test_gspo_and_token_budget_micro_batches_map_to_verl_keys():
    s = verl_settings(make_cfg(), "/d/t.parquet", None)
    assert s[f"{ARR}.actor.policy_loss.loss_mode"] == "vanilla" and f"{ARR}.actor.use_dynamic_bsz" not in s
    s = verl_settings(make_cfg(algorithm={"ratio_level": "sequence"}, train={"micro_batch_tokens": 40_000}),
                      "/d/t.parquet", None)
    assert s[f"{ARR}.actor.policy_loss.loss_mode"] == "gspo"
    assert s[f"{ARR}.actor.use_dynamic_bsz"] is True and s[f"{ARR}.actor.ppo_max_token_len_per_gpu"] == 40_000
    s = verl_settings(make_cfg(algorithm={"tis_mode": "sequence_mask", "tis_cap": None}), "/d/t.parquet", None)
    assert s["algorithm.rollout_correction.rollout_is"] is None  # no correction: nothing for verl to differ on


def test_phi4_plus_recipe_maps_to_the_paper_run():
    from reason.config import load_config

    cfg = load_config(GRPOConfig, "configs/phi4-reasoning-plus/grpo.yaml",
                      ["model.path=/models/phi4-reasoning", "train.out_dir=/shared/plus"])
    s = verl_settings(cfg, "/d/t.parquet", None)
    assert s[f"{ARR}.rollout.n"] == 8 and s["data.train_batch_size"] == 64
    assert s[f"{ARR}.actor.use_kl_loss"] is True and s[f"{ARR}.actor.kl_loss_coef"] == 0.001
    assert s[f"{ARR}.actor.entropy_coeff"] == 0.001 and s[f"{ARR}.actor.optim.lr"] == 5e-8
    assert s["data.max_response_length"] == 31_744 and s["trainer.total_training_steps"] == 90
    assert s["algorithm.rollout_correction.rollout_is"] is None  # the paper predates TIS: the recipe's tis_cap is null
    assert s["data.val_files"] == "/d/t.parquet" and s["trainer.val_before_train"] is False


def test_lora_maps_to_verls_fsdp_lora_keys():
    s = verl_settings(make_cfg(), "/d/t.parquet", None)
    assert f"{ARR}.model.lora_rank" not in s  # verl's default rank 0: no LoRA
    s = verl_settings(make_cfg(model={"path": "/m", "lora": {"r": 32, "alpha": 64, "target_modules": ["q_proj"]}}),
                      "/d/t.parquet", None)
    assert (s[f"{ARR}.model.lora_rank"], s[f"{ARR}.model.lora_alpha"], s[f"{ARR}.model.target_modules"]) == \
        (32, 64, ["q_proj"])


@pytest.mark.parametrize("section, value, key", [
    ("model", {"path": "/m", "lora": {"dropout": 0.05}}, "model.lora.dropout"),
    ("rollout", {"engine": "hf"}, "rollout.engine"),
    ("rollout", {"anneal_to": 0.6, "anneal_steps": 10}, "rollout.anneal_to"),
    ("algorithm", {"rebalance": True}, "algorithm.rebalance"),
    ("algorithm", {"pass_rate_band": [0.1, 0.6]}, "algorithm.pass_rate_band"),
    ("optim", {"schedule": "linear"}, "optim.schedule"),
    ("train", {"device": "cpu"}, "train.device"),
    ("model", {"path": "default"}, "model.path"),
    ("algorithm", {"mask_truncated": True}, "algorithm.mask_truncated"),
    ("algorithm", {"tis_mode": "sequence_mask"}, "algorithm.tis_mode"),
])
def test_settings_verl_cannot_run_are_refused_by_name(section, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        verl_settings(make_cfg(**{section: value}), "/d/t.parquet", None)


def test_reward_goes_under_reward_and_never_through_legacy_keys():
    overrides = verl_overrides(make_cfg(), "/d/t.parquet", None)
    assert "reward.custom_reward_function.path='pkg://rewards.verl'" in overrides
    assert "reward.reward_manager.source='importlib'" in overrides
    assert not [o for o in overrides if o.lstrip("+").startswith(LEGACY_PREFIXES)]
    with pytest.raises(ConfigError, match="ignores"):
        check_no_legacy_keys(overrides + ["custom_reward_function.path=/x.py"])


def test_hydra_values():
    assert hydra_value(None) == "null" and hydra_value(True) == "true" and hydra_value(5e-8) == "5e-08"
    assert hydra_value(["a", 1]) == "['a',1]"
    assert hydra_value("it's") == r"'it\'s'"
    assert hydra_value("a\\nb\\") == "'a\\nb\\\\'"  # only backslashes before a quote are doubled
    with pytest.raises(TypeError):
        hydra_value(object())


def test_export_verl_cli_writes_rlhf_schema(tmp_path, recipe):
    path, _ = recipe
    out = tmp_path / "verl"
    r = rl_cli("export-verl", "--config", path, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"rows": {"train": 2, "validation": 2},
                                                     "dropped_no_answer": {"train": 1, "validation": 1}}
    assert "1 dropped: no ground truth" in r.stderr
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert rows[0]["prompt"] == [{"role": "system", "content": PHI4_SYSTEM_PROMPT},
                                 {"role": "user", "content": "What is 2 + 2?"}]
    assert [r["reward_model"] for r in rows] == [{"style": "rule", "ground_truth": "4"},
                                                 {"style": "rule", "ground_truth": "9"}]
    assert [r["extra_info"] for r in rows] == [{"index": 0, "id": "p1", "split": "train"},
                                               {"index": 1, "id": "p2", "split": "train"}]
    assert {r["data_source"] for r in rows} == {"toy"} and rows[0]["ability"] == "math"


def test_export_uses_the_recipe_system_prompt(tmp_path, recipe):
    path, _ = recipe
    r = rl_cli("export-verl", "-c", path, "-o", tmp_path / "v", "--set", "chat.system_prompt=null")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "v" / "train.parquet").to_pylist()[0]["prompt"] == [
        {"role": "user", "content": "What is 2 + 2?"}]


def test_export_synthetic_problems(tmp_path):
    from rl.verl_data import export_verl

    cfg = make_cfg(data={"train": {"synthetic": {"n": 5, "levels": [1]}}}, chat={"system_prompt": None})
    result = export_verl(cfg, tmp_path)
    rows = pq.read_table(result.train).to_pylist()
    assert result.rows == {"train": 5} and result.validation is None and len(rows) == 5
    assert all(r["reward_model"]["ground_truth"] and r["data_source"] == "synthetic" for r in rows)
    assert [r["prompt"][0]["role"] for r in rows] == ["user"] * 5


@pytest.mark.parametrize("args, needle", [
    (["--set", "rollout.group_sise=4"], "'rollout.group_sise': unknown key"),
    (["--set", "rollout.group_size=1"], "group_size must be >= 2"),
])
def test_bad_recipe_gives_clear_error(tmp_path, recipe, args, needle):
    path, _ = recipe
    r = rl_cli("export-verl", "-c", path, "-o", tmp_path / "v", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "v").exists()


def test_submit_to_unreachable_address_fails_clearly(recipe):
    path, _ = recipe
    r = rl_cli("submit", "--address", "http://127.0.0.1:9", "--config", path, "--set", "train.out_dir=/shared/grpo")
    assert r.returncode == 2 and "cannot reach Ray at http://127.0.0.1:9" in r.stderr, r.stderr


def test_submit_dry_run_without_verl_prints_overrides(recipe):
    path, _ = recipe
    r = rl_cli("submit", "-a", "http://127.0.0.1:9", "-c", path, "--engine", "verl", "--dry-run")
    assert r.returncode == 2 and "train.out_dir: 'runs/grpo' is relative" in " ".join(r.stderr.split())
    r = rl_cli("submit", "-a", "http://127.0.0.1:9", "-c", path, "--engine", "verl", "--dry-run",
               "--set", "train.out_dir=/shared/grpo")
    assert r.returncode == 0, r.stderr
    assert f"{ARR}.rollout.n=8" in r.stdout.splitlines()
    assert "verl is not installed here" in r.stderr


def test_job_dir_path_expands_on_the_cluster_shell(tmp_path):
    args = [_shell_arg(f"data.train_files='{JOB_DIR}/data/t.parquet'"), _shell_arg("x=it's $HOME")]
    out = subprocess.run(["bash", "-c", "printf '%s\\n' " + " ".join(args)], cwd=tmp_path,
                         capture_output=True, text=True).stdout.splitlines()
    assert out == [f"data.train_files='{tmp_path}/data/t.parquet'", "x=it's $HOME"]


def test_local_engine_job_dir_is_self_contained(recipe):
    from reason.config import ConfigError, load_config

    path, _ = recipe
    with pytest.raises(ConfigError, match="train.out_dir"):  # relative: inside Ray's shared, deletable job dir
        submit_grpo("http://unused", load_config(GRPOConfig, path), "local", dry_run=True)
    cfg = load_config(GRPOConfig, path, ["train.out_dir=/shared/runs/grpo"])
    job = submit_grpo("http://unused", cfg, "local", dry_run=True)
    assert job["job_id"] is None and job["entrypoint"] == "reason rl train --config recipe.yaml"
    staged = load_config(GRPOConfig, f"{job['job_dir']}/recipe.yaml")
    assert (staged.data.train.path, staged.data.validation.path) == ("data/train.jsonl", "data/validation.jsonl")
    assert (path.parent / "problems.jsonl").read_text() == open(f"{job['job_dir']}/data/train.jsonl").read()
    shutil.rmtree(job["job_dir"])
