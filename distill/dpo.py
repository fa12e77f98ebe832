"""Rollout preference learning with DPO: Phi-4-mini-reasoning stage 3.

arXiv 2504.21233 (docs/recipes.md §3): a verified-correct teacher rollout is "chosen", an
incorrect one of the same problem "rejected" (pairs from `distill.pairs`), and the
SFT model is both the starting point and the frozen reference; 16K context,
lr 5e-7, one epoch. Loss, the sigmoid form of DPO (Rafailov et al., 2023), per pair:

    r_c = beta * (log pi(chosen) - log ref(chosen))      # implicit rewards, each a sum
    r_r = beta * (log pi(rejected) - log ref(rejected))  # over the response tokens + EOS
    loss = -log sigmoid(r_c - r_r)

Responses are masked, packed and batched exactly like SFT (a pair always shares
one row), and the loop, checkpoints, resume and export are SFT's (`distill.sft.fit`).

The same loss trains Phi-4's (arXiv 2412.08905 section 4.3) two DPO rounds: on Pivotal
Token Search's single-token pairs (`reason distill pts`), where each sum above is one
token's log-probability after the shared prompt and prefix, and on judge-guided pairs
(`reason distill judge-pairs`), whole responses; sources of any kind mix in `data.train`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distill.batches import Batch, DataConfig, load_datasets
from distill.runtime import init_distributed
from distill.sft import Objective, SFTTrainConfig, TokenLogProbs, describe_data, fit, target_logprobs
from reason.chat import IGNORE_INDEX, ChatConfig
from reason.config import Section
from reason.models import ModelConfig, load_model
from reason.tracker import TrackerConfig
from reason.train import OptimConfig, TrainResult


class DPOOptions(Section):
    beta: float = 0.1  # not published for Phi-4-mini; 0.1 is the common default
    reference: str | None = None  # reference model dir; default: model.path (the SFT model)


class DPOTrainConfig(SFTTrainConfig):
    out_dir: str = "runs/dpo"


class DPOConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    data: DataConfig
    dpo: DPOOptions = Field(default_factory=DPOOptions)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards; inputs are summed logprobs, [P] each."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # [P]
    rejected_reward = beta * (policy_rejected - ref_rejected)  # [P]
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def sequence_logprobs(module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each sequence's targets: [S], in the order collated."""
    logp = target_logprobs(module, batch)  # [N]
    seq = batch.seq_ids[batch.targets != IGNORE_INDEX]  # [N] sequence of each target
    return torch.zeros(len(batch.seq_sources), dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)


def dpo_objective(reference: TokenLogProbs, beta: float) -> Objective:
    def loss(module, batch: Batch, n_sources: int):
        policy = sequence_logprobs(module, batch)  # [2P]: chosen, rejected, chosen, ...
        with torch.no_grad():
            ref = sequence_logprobs(reference, batch)  # [2P]
        losses, rc, rr = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta)
        margin = (rc - rr).detach().double()
        sums = {"loss": losses.detach().double().sum(), "pairs": torch.tensor(len(losses), dtype=torch.float64),
                "margin": margin.sum(), "accuracy": (margin > 0).double().sum(),
                "chosen_reward": rc.detach().double().sum(), "rejected_reward": rr.detach().double().sum()}
        return losses.sum(), {k: v.to(policy.device) for k, v in sums.items()}

    def summarise(sums, names):
        n = sums["pairs"].clamp(min=1)
        return {k: (v / n).item() for k, v in sums.items() if k != "pairs"}

    return Objective(loss, lambda item: 1, summarise)


def train_dpo(cfg: DPOConfig) -> TrainResult:
    """Run DPO as configured; under torchrun every process calls this."""
    env = init_distributed(cfg.train, cfg.model)
    try:
        torch.manual_seed(cfg.train.seed)
        lm, tokenizer = load_model(cfg.model, cfg.chat, env.device)
        ref_cfg = cfg.model.model_copy(update={"path": cfg.dpo.reference or cfg.model.path, "lora": None})
        ref_lm, _ = load_model(ref_cfg, cfg.chat, env.device, trainable=False,
                               key="dpo.reference" if cfg.dpo.reference else "model.path")
        train_ds, eval_ds = load_datasets(cfg.data, tokenizer, cfg.chat, "dpo")
        describe_data(train_ds, eval_ds, env)
        reference = TokenLogProbs(ref_lm, chunk=cfg.train.logits_chunk)
        return fit(cfg, lm, tokenizer, train_ds, eval_ds, dpo_objective(reference, cfg.dpo.beta), env)
    finally:
        env.close()
