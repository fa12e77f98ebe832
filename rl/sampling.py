"""GRPO sampling stabilisers: which prompts and samples reach the loss, at what temperature.

Paper knobs implemented here:
- Phi-4-mini-reasoning (arXiv 2504.21233; docs/recipes.md §3): dropping groups
  whose samples are all right or all wrong (`zero_variance_groups`; by pass rate,
  `reason.passk.band_verdict`), balancing positive and negative samples
  by oversampling (`rebalance`), temperature annealed linearly 1.0 -> 0.6 early
  in training, then held (`temperature_at`).
- DAPO dynamic sampling (arXiv 2503.14476, section 3.2): keep only informative
  groups and draw more prompts until the batch is full (`keep_informative`).
- Exact resume: `PromptSampler` saves its data position,
  so a resumed run draws exactly the prompts an uninterrupted run draws.

Rewards arrive flat, group after group: rewards[g*G:(g+1)*G] are prompt g's G samples.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [B]: True where all G rewards of the group are exactly equal.

    Such a group has advantage 0 for every sample and so contributes no gradient.

    >>> zero_variance_groups(torch.tensor([1., 1., 0., 1.]), 2).tolist()
    [True, False]
    """
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries")
    r = rewards.view(-1, group_size)  # [B, G]
    return (r == r[:, :1]).all(dim=1)


@dataclass(frozen=True)
class Informative:
    """What `keep_informative` kept from one round of rollouts, and what is missing."""

    groups: list[int]  # kept group indices, in order (at most `need`)
    rows: torch.Tensor  # [len(groups) * G] their rows in the flat batch
    zero_variance: int  # groups dropped because all their rewards were equal
    surplus: int  # informative groups dropped because `need` was already met
    short: int  # informative groups still missing to reach `need`
    to_draw: int  # prompts to roll out next to make up `short`, at this round's rate


def keep_informative(rewards: torch.Tensor, group_size: int, need: int) -> Informative:
    """DAPO dynamic sampling: keep up to `need` groups whose rewards are not all equal.

    The first `need` informative groups are kept, in order, and the rest dropped
    (DAPO truncates the same way). If fewer were found, `to_draw` estimates how
    many prompts the next round should roll out: `short` divided by this round's
    fraction of informative groups, rounded up; if none were informative, as many
    prompts as this round had. The caller loops, passing `need=result.short`,
    until `short` is 0 (and should cap the rounds, as DAPO does).
    """
    if need < 0:
        raise ValueError(f"need must be >= 0, got {need}")
    zero = zero_variance_groups(rewards, group_size)  # [B]
    informative = (~zero).nonzero().flatten().tolist()
    kept = informative[:need]
    short = need - len(kept)
    if short == 0:
        to_draw = 0
    elif informative:
        to_draw = math.ceil(short * zero.numel() / len(informative))
    else:
        to_draw = zero.numel()
    rows = (torch.tensor(kept, dtype=torch.long)[:, None] * group_size + torch.arange(group_size)).flatten()
    return Informative(kept, rows, int(zero.sum()), len(informative) - len(kept), short, to_draw)


def rebalance(rewards: torch.Tensor, positive: torch.Tensor, group_size: int, seed: int) -> torch.Tensor:
    """Row indices that balance positive and negative samples by oversampling the minority.

    `positive` [B*G] marks the correct samples (the verifier's verdict: with
    `accuracy + 0.2 * format` a wrong, well-formed answer has reward > 0 and is still
    negative). Only rows of informative groups (by `rewards`) are counted and copied: a
    zero-variance group has advantage 0 on every row, so copies of it would change
    nothing but the normaliser.

    Returns every row once, in order, then |n_pos - n_neg| extra copies of
    minority rows, drawn as whole passes over seeded permutations of the minority:
    each minority row is copied floor(d / n_min) or ceil(d / n_min) times (d the
    deficit), identically for the same seed. If either side is empty there is
    nothing to oversample and the rows come back unchanged. Index the batch with
    the result after computing group advantages: copies keep their group's advantage.
    """
    if positive.shape != rewards.shape or positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool tensor shaped like rewards {tuple(rewards.shape)}")
    informative = (~zero_variance_groups(rewards, group_size)).repeat_interleave(group_size)  # [B*G]
    pos = (informative & positive).nonzero().flatten()
    neg = (informative & ~positive).nonzero().flatten()
    everything = torch.arange(rewards.numel())
    minority, deficit = (pos, len(neg) - len(pos)) if len(pos) < len(neg) else (neg, len(pos) - len(neg))
    if len(minority) == 0 or deficit == 0:
        return everything
    gen = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(len(minority), generator=gen) for _ in range(math.ceil(deficit / len(minority)))]
    extra = minority[torch.cat(passes)[:deficit]]
    return torch.cat([everything, extra])


def temperature_at(step: int, start: float = 1.0, end: float = 0.6, *, anneal_steps: int) -> float:
    """Sampling temperature at optimiser step `step` (from 0): linear start -> end, then held.

    >>> [temperature_at(s, anneal_steps=4) for s in (0, 4, 9)]
    [1.0, 0.6, 0.6]
    """
    if step < 0 or anneal_steps < 0:
        raise ValueError(f"step and anneal_steps must be >= 0, got {step}, {anneal_steps}")
    if step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


class PromptSampler:
    """Seeded, epoch-shuffled order over `n` prompts; `draw(k)` runs on across epochs.

    Epoch e's order depends only on (seed, e), so `load_state_dict` rebuilds it from
    the saved position: a resumed run draws exactly what an uninterrupted run would,
    with no prompt skipped or replayed.
    """

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        # Seeding with a string hashes it (sha512): stable across Python versions.
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def draw(self, k: int) -> list[int]:
        """The next k prompt indices, starting a new shuffled epoch whenever one runs out."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            take = min(k - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`; a different dataset size or seed is an error."""
        if (state["n"], state["seed"]) != (self.n, self.seed):
            raise ValueError(f"sampler state is for n={state['n']}, seed={state['seed']}; "
                             f"this run has n={self.n}, seed={self.seed}")
        if not 0 <= state["pos"] <= self.n or state["epoch"] < 0:
            raise ValueError(f"bad sampler position: epoch={state['epoch']}, pos={state['pos']}")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle(self.epoch)
