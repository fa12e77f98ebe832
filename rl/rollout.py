"""GRPO rollouts and their rewards: prompts in, scored groups of G completions out.

Paper knobs: G samples per prompt (`rollout.group_size`; Phi-4-reasoning-plus used
G = 8), the sampling temperature (annealed by `rl.sampling.temperature_at`), the
response limit (`rollout.max_tokens`; 31,744 tokens in Phi-4-plus), and the
recipe's weighted reward terms (`reward.terms`, phi4_plus by default).

Rewards run in the killable workers of one `rewards.score.Scorer` for the whole run
(a hung verification once froze whole RL jobs in a peer system), from a background
thread so the trainer computes reference log-probs meanwhile. Custom rewards reach the
workers by `module:function` or `file.py:function` name: `rewards.registry.register`
only registers in the calling process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from reason.chat import ChatConfig, render_prompt
from reason.engine import Sample, SamplingConfig
from reason.records import Problem, Rollout
from rewards.score import Scorer, ScoreSample, is_correct
from rl.sampling import zero_variance_groups


@dataclass
class PromptSet:
    """Problems with their chat-rendered prompt token ids; over-long prompts dropped."""

    problems: list[Problem]
    ids: list[list[int]]
    too_long: int  # problems dropped: prompt longer than rollout.max_prompt_tokens


def encode_prompts(problems: list[Problem], tokenizer, chat: ChatConfig, max_prompt_tokens: int) -> PromptSet:
    """Render every prompt with the chat format and tokenize it (the template writes any BOS)."""
    texts = [render_prompt(tokenizer, p.prompt, chat) for p in problems]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_tokens]
    return PromptSet([problems[i] for i in keep], [encoded[i] for i in keep], len(problems) - len(keep))


@dataclass
class Group:
    """One prompt's G completions, their rewards once scored, and reference log-probs."""

    problem: Problem
    prompt_ids: list[int]
    samples: list[Sample]
    components: list[dict | None] = field(default_factory=list)  # per sample; None = skipped
    ref_logprobs: list[torch.Tensor] | None = None  # per sample [T_i], when beta > 0

    @property
    def scored(self) -> bool:
        """False when any sample was skipped (e.g. an unusable ground truth): no baseline then."""
        return bool(self.components) and all(c is not None for c in self.components)

    def correct(self) -> list[bool | None]:
        """Per sample: the reward's verdict (its "acc" component); None where it gives none."""
        return [is_correct(c) for c in self.components]

    def rollouts(self) -> list[Rollout]:
        """The shared Rollout records of this group, for the samples log."""
        return [Rollout(problem=self.problem, completion=s.text, token_ids=s.token_ids, logprobs=s.logprobs or [],
                        finish_reason=s.finish_reason, rewards=c or {})
                for s, c in zip(self.samples, self.components)]


def group_rewards(groups: list[Group]) -> torch.Tensor:
    """Every sample's score, group after group: [len(groups) * G]."""
    return torch.tensor([c["score"] for g in groups for c in g.components], dtype=torch.float64)


def rollout_metrics(groups: list[Group], size: int) -> dict[str, float]:
    """What the policy did this step: lengths, truncation, rewards and each component, accuracy."""
    samples = [s for g in groups for s in g.samples]
    out = {"samples": len(samples), "response_len/mean": sum(s.num_tokens for s in samples) / len(samples),
           "response_len/max": max(s.num_tokens for s in samples),
           "truncation_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples)}
    scored = [g for g in groups if g.scored]
    if not scored:
        return out
    comps = [c for g in scored for c in g.components]
    for key in dict.fromkeys(k for c in comps for k in c):
        values = [c[key] for c in comps if key in c]
        out["reward/mean" if key == "score" else f"reward/{key}"] = sum(values) / len(values)
    judged = [(flag, s.num_tokens) for g in scored for flag, s in zip(g.correct(), g.samples) if flag is not None]
    if judged:  # a reward without an "acc" component gives no verdict, hence no accuracy
        out["accuracy"] = sum(f for f, _ in judged) / len(judged)
        right = [n for f, n in judged if f]
        if right:
            out["response_len/correct_mean"] = sum(right) / len(right)
    out["zero_variance_frac"] = float(zero_variance_groups(group_rewards(scored), size).float().mean())
    return out


def sample_groups(engine, prompts: PromptSet, indices: list[int], sampling: SamplingConfig) -> list[Group]:
    """G = sampling.n completions for each prompt index, from the engine."""
    outs = engine.generate([prompts.ids[i] for i in indices], sampling)
    return [Group(prompts.problems[i], prompts.ids[i], samples) for i, samples in zip(indices, outs)]


def score_sample(problem: Problem, sample: Sample) -> ScoreSample:
    """What a reward sees of one rollout: the completion, its token count and finish, the problem's fields."""
    return ScoreSample(completion=sample.text, ground_truth=problem.ground_truth, num_tokens=sample.num_tokens,
                       finish_reason=sample.finish_reason, source=problem.source, id=problem.id)


def score_groups(scorer: Scorer, groups: list[Group]) -> dict[str, float]:
    """Set every group's reward components; returns {"timeouts": n, "seconds": wall time}."""
    t0 = time.perf_counter()
    rows, summary = scorer.score([score_sample(g.problem, s) for g in groups for s in g.samples])
    values = iter(r["components"] for r in rows)  # None: skipped (or verification hung twice)
    for g in groups:
        g.components = [next(values) for _ in g.samples]
    return {"timeouts": summary.timeouts, "seconds": time.perf_counter() - t0}
