"""Map a `reason` GRPO recipe onto Hydra overrides for verl 0.9's `verl.trainer.main_ppo`.

Phi-4-reasoning-plus was trained with verl (arXiv 2504.21318; docs/recipes.md §2); this module
turns the same recipe YAML the local trainer reads into the command-line
overrides of verl's own `ppo_trainer` config, so a cluster run uses verl's
distributed trainer with this project's data, chat format and rewards. Every
GRPOConfig key is mapped, declared local-only with its reason (`LOCAL_ONLY`), or,
where verl 0.9 cannot honour it (temperature annealing, rebalancing, pass-rate
filtering, a cap on resampling rounds, linear LR decay, the HF engine, CPU training,
relative paths, LoRA dropout), refused with a ConfigError naming the key: a recipe never means
something different on the cluster.

The reward goes through `reward.custom_reward_function.*` (rewards.verl) and
`reward.reward_manager.*` (rl.verl_reward, which keeps the think tags). verl
0.9.1 still accepts the old top-level `custom_reward_function.*` keys but
ignores them, so `check_no_legacy_keys` refuses any override that uses them.

Known differences from the local maths (rl.losses), by verl's design: verl's
policy loss adds dual-clip (the loss of a negative-advantage token is capped at
3|A|, `clip_ratio_c`; not with GSPO), its "k3" KL is clamped like "low_var_kl", its
sequence means skip fully masked sequences where ours count them as 0, and its GSPO
clamps the log-ratio at 10 where ours clamps at 20. `train.micro_batch_tokens` becomes
verl's per-GPU token budget, which counts a group's prompt once per row where ours
counts it once: the same gradient, fewer rows per verl micro-batch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from reason.chat import TEMPLATES
from reason.config import ConfigError

ENTRYPOINT = "python -m verl.trainer.main_ppo"
# Keys verl 0.9.1 validates but never reads (migrated only by its fully-async trainer).
LEGACY_PREFIXES = ("custom_reward_function.", "reward_model.", "sandbox_fusion.")
# Keys that are not in verl's schema and so need Hydra's `+` to be added.
NEW_KEYS = ("reward.custom_reward_function.reward_kwargs",)
ARR = "actor_rollout_ref"


# Recipe keys (and sections) verl needs nothing for, and why. Every other GRPOConfig key is
# mapped in `verl_settings` or refused in `_unsupported` (tests/test_verl_bridge.py checks both).
LOCAL_ONLY = {
    "model.dtype": "the master weights' dtype: float32 here, as in verl's FSDP",
    "model.attn_implementation": "the attention kernel: verl picks its own on GPUs; the maths is the same",
    "data.train": "read by the Parquet export (data.train_files)",
    "data.validation": "read by the Parquet export (data.val_files)",
    "rollout.anneal_steps": "read only with rollout.anneal_to, which verl refuses",
    "chat.system_prompt": "written into the exported prompts",
    "chat.think_tokens": "the checkpoint's tokenizer must already carry the tags (the SFT export does)",
    "chat.think_token_ids": "as chat.think_tokens",
    "train.device": "verl places its own workers; cpu is refused",
    "train.logits_chunk": "a memory knob of the local LM head; the log-probs are the same, and verl's actor "
                          "bounds its logits its own way (use_fused_kernels, entropy_checkpointing)",
}


def _unsupported(cfg) -> list[str]:
    """The recipe settings verl 0.9 cannot honour, as 'key: why' lines."""
    from reason.models import is_hub_id

    a, r, o, m, t = cfg.algorithm, cfg.rollout, cfg.optim, cfg.model, cfg.train
    checks = [
        (r.engine == "hf", "rollout.engine: verl rolls out with vLLM only; use vllm or auto"),
        (r.anneal_to is not None, "rollout.anneal_to: verl 0.9 has no temperature annealing"),
        (a.rebalance, "algorithm.rebalance: verl 0.9 has no positive/negative rebalancing"),
        (a.pass_rate_band is not None, "algorithm.pass_rate_band: verl 0.9 has no pass-rate prompt "
                                       "filter; filter the problems before exporting"),
        (a.dynamic_sampling and a.max_resample_rounds is not None,
         "algorithm.max_resample_rounds: verl 0.9's trainer ignores a cap on resampling rounds "
         "(filter_groups.max_num_gen_batches); set it to null to resample until the batch is full"),
        (o.schedule == "linear", "optim.schedule: verl 0.9's FSDP optimizer has only constant and cosine"),
        (t.device == "cpu", "train.device: verl's trainer needs GPUs (NCCL); it cannot train on CPU"),
        (t.stop_after is not None, "train.stop_after: verl has no stop-and-resume-later knob; set train.steps"),
        (m.path == "default", "model.path: 'default' is the embedded model on this machine; give "
                              "a model directory or hub id that every node can read"),
        # a relative path means nothing on another machine (a hub id `org/name` is no path)
        (m.path != "default" and not Path(m.path).is_absolute() and not is_hub_id(m.path),
         f"model.path: {m.path!r} is relative; verl would resolve it inside the uploaded job dir, where no model "
         "was sent"),
        (not Path(t.out_dir).is_absolute(), f"train.out_dir: {t.out_dir!r} is relative; verl would write "
                                            "checkpoints inside the uploaded job dir, which Ray may delete"),
        (m.rope_theta_scale != 1.0, "model.rope_theta_scale: verl reads the checkpoint's config; scale RoPE "
                                    "in it before submitting"),
        (m.max_position_embeddings is not None, "model.max_position_embeddings: verl reads the checkpoint's "
                                                "config; set it there before submitting"),
        (t.autocast == "none", "train.autocast: verl trains in bf16 over float32 weights; use auto or bfloat16"),
        (a.mask_truncated, "algorithm.mask_truncated: verl 0.9 has no overlong filtering (DAPO's overlong buffer "
                           "there is a length penalty in the reward, not a loss mask)"),
        (m.lora is not None and m.lora.dropout != 0, "model.lora.dropout: verl 0.9's FSDP LoRA has no adapter "
                                                     "dropout; set it to 0"),
        (a.tis_cap is not None and a.tis_mode == "sequence_mask",
         "algorithm.tis_mode: verl 0.9's sequence rejection (rollout_rs) also rejects ratios below 1/cap and drops "
         "rejected tokens from the loss normaliser; TRL's sequence_mask, which this is, does neither"),
    ]
    return [why for bad, why in checks if bad]


_LOGGERS = {"jsonl": "file", "tensorboard": "tensorboard", "wandb": "wandb"}  # tracker backend -> verl logger


def verl_settings(cfg, train_files: str, val_files: str | None, experiment: str = "grpo") -> dict[str, Any]:
    """The verl config values for a GRPOConfig, as {dotted key: python value}."""
    problems = _unsupported(cfg)
    if problems:
        raise ConfigError("recipe settings verl cannot run:\n  " + "\n  ".join(problems))
    m, d, r, a, o, t, c = cfg.model, cfg.data, cfg.rollout, cfg.algorithm, cfg.optim, cfg.train, cfg.cluster
    compute = "bfloat16"  # verl trains on GPUs, all of which have fast bf16; train.autocast none is refused
    actor, rollout = f"{ARR}.actor", f"{ARR}.rollout"
    s: dict[str, Any] = {
        "algorithm.adv_estimator": "grpo",
        "algorithm.norm_adv_by_std_in_grpo": a.adv_scale == "std",
        "algorithm.use_kl_in_reward": False,  # GRPO puts the KL in the loss, not the reward
        "algorithm.filter_groups.enable": a.dynamic_sampling,
        "algorithm.filter_groups.metric": "reward",
        # Truncated importance sampling against vLLM's log-probs (Yao et al.), per token.
        "algorithm.rollout_correction.rollout_is": None if a.tis_cap is None else "token",
        "algorithm.rollout_correction.rollout_is_threshold": a.tis_cap or 2.0,
        "data.train_files": train_files,
        "data.val_files": val_files or train_files,
        "data.train_batch_size": t.prompts_per_step,
        "data.max_prompt_length": r.max_prompt_tokens,
        "data.max_response_length": r.max_tokens,
        "data.filter_overlong_prompts": True,
        "data.seed": d.seed,
        f"{ARR}.model.path": m.path,
        f"{ARR}.model.enable_gradient_checkpointing": m.gradient_checkpointing,
        f"{actor}.ppo_mini_batch_size": t.prompts_per_step,  # one optimiser step per batch and epoch
        f"{actor}.ppo_micro_batch_size_per_gpu": t.micro_batch,
        f"{actor}.ppo_epochs": a.epochs,
        f"{actor}.clip_ratio": a.clip_low,
        f"{actor}.clip_ratio_low": a.clip_low,
        f"{actor}.clip_ratio_high": a.clip_high,
        f"{actor}.loss_agg_mode": a.loss_agg,
        f"{actor}.policy_loss.loss_mode": "gspo" if a.ratio_level == "sequence" else "vanilla",
        f"{actor}.use_kl_loss": a.kl_beta > 0,
        f"{actor}.kl_loss_coef": a.kl_beta,
        f"{actor}.kl_loss_type": a.kl_type,
        f"{actor}.entropy_coeff": a.entropy_gamma,
        f"{actor}.fsdp_config.dtype": compute,
        f"{actor}.optim.lr": o.lr,
        f"{actor}.optim.lr_warmup_steps": o.warmup_steps or -1,  # -1: verl takes the ratio
        f"{actor}.optim.lr_warmup_steps_ratio": o.warmup_ratio,
        f"{actor}.optim.lr_scheduler_type": o.schedule,
        f"{actor}.optim.min_lr_ratio": o.min_lr_ratio,
        f"{actor}.optim.override_optimizer_config": {"eps": o.eps},
        f"{actor}.optim.weight_decay": o.weight_decay,
        f"{actor}.optim.betas": list(o.betas),
        f"{actor}.optim.clip_grad": o.max_grad_norm,
        f"{ARR}.ref.log_prob_micro_batch_size_per_gpu": t.micro_batch,
        f"{rollout}.name": "vllm",
        f"{rollout}.n": r.group_size,
        f"{rollout}.temperature": r.temperature,
        f"{rollout}.top_p": r.top_p,
        f"{rollout}.dtype": compute,
        f"{rollout}.seed": t.seed,
        f"{rollout}.gpu_memory_utilization": r.gpu_memory_utilization,
        f"{rollout}.tensor_model_parallel_size": c.tensor_parallel,
        f"{rollout}.log_prob_micro_batch_size_per_gpu": t.micro_batch,
        "reward.custom_reward_function.path": "pkg://rewards.verl",
        "reward.custom_reward_function.name": "compute_score",
        "reward.custom_reward_function.reward_kwargs": {"terms": [x.model_dump() for x in cfg.reward.terms],
                                                        "think_open": cfg.chat.think_open,
                                                        "think_close": cfg.chat.think_close,
                                                        "timeout": cfg.reward.timeout},
        "reward.reward_manager.source": "importlib",
        "reward.reward_manager.name": "ReasonRewardManager",
        "reward.reward_manager.module.path": "pkg://rl.verl_reward",
        "trainer.project_name": cfg.tracker.project,
        "trainer.experiment_name": cfg.tracker.run_name or experiment,
        "trainer.logger": ["console", *(_LOGGERS[b] for b in cfg.tracker.backends)],
        "trainer.nnodes": c.nnodes,
        "trainer.n_gpus_per_node": c.n_gpus_per_node,
        "trainer.total_training_steps": t.steps,
        "trainer.save_freq": t.save_every,
        "trainer.default_local_dir": t.out_dir,
        "trainer.max_actor_ckpt_to_keep": t.keep_checkpoints,
        "trainer.resume_mode": "auto" if t.resume else "disable",
        "trainer.val_before_train": val_files is not None,
        "trainer.test_freq": t.save_every if val_files is not None else -1,
        # verl dumps every step's samples; log_samples_every has no finer verl knob.
        "trainer.rollout_data_dir": f"{t.out_dir}/rollouts" if t.log_samples_every > 0 else None,
    }
    if m.lora is not None:  # verl's FSDP actor wraps the model with peft too; its reference is adapters-off as ours
        s.update({f"{ARR}.model.lora_rank": m.lora.r, f"{ARR}.model.lora_alpha": m.lora.alpha,
                  f"{ARR}.model.target_modules": m.lora.target_modules})
    if t.micro_batch_tokens is not None:  # the reference's and rollout's log-prob passes follow the actor's
        s[f"{actor}.use_dynamic_bsz"] = True
        s[f"{actor}.ppo_max_token_len_per_gpu"] = t.micro_batch_tokens
    if cfg.reward.workers:
        s["reward.num_workers"] = cfg.reward.workers
    if cfg.chat.template != "tokenizer":
        s[f"{ARR}.model.custom_chat_template"] = TEMPLATES[cfg.chat.template]
    return s


def hydra_value(v: Any) -> str:
    """A python value in Hydra's override grammar: strings quoted, lists and dicts nested.

    >>> hydra_value({"terms": [{"name": "phi4_plus", "weight": 1.0}]})
    "{terms:[{name:'phi4_plus',weight:1.0}]}"
    """
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # Hydra unescapes backslashes only where they run into a quote (or the closing one).
        v = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, v)
        return "'" + v.replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as a Hydra value: {v!r}")


def check_no_legacy_keys(overrides: list[str]) -> None:
    """Refuse overrides that verl 0.9.1 accepts and then silently ignores."""
    bad = [o for o in overrides if o.lstrip("+~").startswith(LEGACY_PREFIXES)]
    if bad:
        raise ConfigError(f"verl 0.9.1 ignores these top-level keys; use reward.* instead: {bad}")


def verl_overrides(cfg, train_files: str, val_files: str | None = None, experiment: str = "grpo") -> list[str]:
    """The Hydra overrides for `python -m verl.trainer.main_ppo` that run this recipe (`+key=` for a new key)."""
    settings = verl_settings(cfg, train_files, val_files, experiment)
    out = [f"{'+' if k in NEW_KEYS else ''}{k}={hydra_value(v)}" for k, v in settings.items()]
    check_no_legacy_keys(out)
    return out


def compose_verl(overrides: list[str]):
    """verl's own ppo_trainer config with the overrides, checked by verl's validate_config.

    Needs verl installed (its own environment); returns the composed DictConfig.
    """
    from hydra import compose, initialize_config_module
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    return config
