"""Sampling stabilisers: zero-variance groups, dynamic sampling, rebalancing, temperature, filters, resume."""
import doctest
import json
from collections import Counter

import pytest
import torch

import rl.sampling
from rl.sampling import (
    PromptSampler,
    keep_informative,
    rebalance,
    temperature_at,
    zero_variance_groups,
)


def test_docstring_examples():
    assert doctest.testmod(rl.sampling).failed == 0


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, -0.5, -0.75])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True, True, False]


def test_zero_variance_groups_rejects_ragged_batch():
    with pytest.raises(ValueError):
        zero_variance_groups(torch.zeros(5), 2)


# groups (G=2): 0 mixed, 1 all right, 2 mixed, 3 all wrong
ROUND = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])


def test_keep_informative_truncates_to_need():
    got = keep_informative(ROUND, 2, need=1)
    assert got.groups == [0] and got.rows.tolist() == [0, 1]
    assert (got.zero_variance, got.surplus, got.short, got.to_draw) == (2, 1, 0, 0)


def test_keep_informative_reports_shortfall():
    got = keep_informative(ROUND, 2, need=5)
    assert got.groups == [0, 2] and got.rows.tolist() == [0, 1, 4, 5]
    # 3 short at 2 informative out of 4 prompts: ceil(3 * 4 / 2) = 6 prompts to draw
    assert (got.zero_variance, got.surplus, got.short, got.to_draw) == (2, 0, 3, 6)


def test_keep_informative_nothing_informative():
    got = keep_informative(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 2, need=4)
    assert got.groups == [] and got.rows.tolist() == []
    assert (got.zero_variance, got.short, got.to_draw) == (3, 4, 3)


def test_keep_informative_need_zero():
    got = keep_informative(ROUND, 2, need=0)
    assert got.groups == [] and (got.surplus, got.short, got.to_draw) == (2, 0, 0)
    with pytest.raises(ValueError):
        keep_informative(ROUND, 2, need=-1)


def test_rebalance_oversamples_minority_evenly():
    # G=4: informative groups 0 and 1 hold 2 positives and 6 negatives; groups 2, 3 are zero-variance.
    rewards = torch.tensor([1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, -1, -1, -1, -1.0])
    idx = rebalance(rewards, rewards > 0, 4, seed=0)
    assert idx[:16].tolist() == list(range(16))
    assert sorted(idx[16:].tolist()) == [0, 0, 7, 7]  # deficit 4 over 2 positives: twice each
    informative_rows = idx[idx < 8]
    assert (rewards[informative_rows] > 0).sum() == (rewards[informative_rows] <= 0).sum() == 6


def test_rebalance_partial_pass_copies_distinct_rows():
    # positives 6, negatives 10 (all groups informative): 4 extra copies of 4 distinct positive rows
    rewards = torch.tensor([1, -1, -1, -1] * 3 + [1, 1, 1, -1.0])
    idx = rebalance(rewards, rewards > 0, 4, seed=3)
    extra = idx[16:].tolist()
    assert len(extra) == 4 and len(set(extra)) == 4 and all(rewards[i] > 0 for i in extra)
    assert Counter((rewards[idx] > 0).tolist()) == {True: 10, False: 10}


def test_rebalance_majority_positive():
    # Phi-4-plus-like rewards: one incorrect sample among four
    rewards = torch.tensor([0.75, 1.0, 0.5, -0.5])
    assert rebalance(rewards, rewards > 0, 4, seed=0).tolist() == [0, 1, 2, 3, 3, 3]


def test_rebalance_counts_correct_samples_not_positive_rewards():
    # accuracy + 0.2 * think_format: one right answer (1.2), two wrong but well formed (0.2), one neither (0.0).
    # By reward > 0 three would be "positive" and the lone 0.0 copied; by correctness the right one is.
    rewards = torch.tensor([1.2, 0.2, 0.2, 0.0])
    correct = torch.tensor([True, False, False, False])
    assert rebalance(rewards, correct, 4, seed=0).tolist() == [0, 1, 2, 3, 0, 0]
    assert rebalance(rewards, rewards > 0, 4, seed=0).tolist() == [0, 1, 2, 3, 3, 3]  # the old, wrong rule
    with pytest.raises(ValueError, match="bool"):
        rebalance(rewards, rewards, 4, seed=0)


def test_rebalance_is_seeded():
    rewards = torch.tensor([1, -1, -1, -1] * 3 + [1, 1, 1, -1.0])
    assert torch.equal(rebalance(rewards, rewards > 0, 4, seed=7), rebalance(rewards, rewards > 0, 4, seed=7))
    extras = {tuple(sorted(rebalance(rewards, rewards > 0, 4, seed=s)[16:].tolist())) for s in range(20)}
    assert len(extras) > 1


def test_rebalance_unchanged_when_one_side_is_empty_or_balanced():
    for rewards in (torch.tensor([0.75, 1.0, 0.5, 0.6]), torch.tensor([1.0, -1.0, -1.0, 1.0])):
        assert rebalance(rewards, rewards > 0, 2, seed=0).tolist() == [0, 1, 2, 3]


def test_temperature_schedule():
    assert temperature_at(0, anneal_steps=100) == 1.0
    assert temperature_at(50, anneal_steps=100) == pytest.approx(0.8)
    assert temperature_at(100, anneal_steps=100) == 0.6
    assert temperature_at(10_000, anneal_steps=100) == 0.6
    assert temperature_at(0, anneal_steps=0) == 0.6
    assert temperature_at(1, start=0.8, end=0.4, anneal_steps=4) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        temperature_at(-1, anneal_steps=10)


def test_prompt_sampler_epochs_are_permutations():
    s = PromptSampler(7, seed=3)
    first, second = s.draw(7), s.draw(7)
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second
    assert s.state_dict() == {"n": 7, "seed": 3, "epoch": 1, "pos": 7}


@pytest.mark.parametrize("cut", [1, 2, 3, 5])  # cut=2 stops exactly at the end of epoch 0
def test_prompt_sampler_resume_draws_the_same_prompts(cut):
    sizes = [3, 4, 5, 6, 2, 9]
    straight = PromptSampler(7, seed=11)
    expected = [straight.draw(k) for k in sizes]

    before = PromptSampler(7, seed=11)
    got = [before.draw(k) for k in sizes[:cut]]
    state = json.loads(json.dumps(before.state_dict()))  # as saved in a checkpoint
    resumed = PromptSampler(7, seed=11)
    resumed.load_state_dict(state)
    got += [resumed.draw(k) for k in sizes[cut:]]
    assert got == expected


def test_prompt_sampler_seed_matters_and_mismatch_is_refused():
    assert PromptSampler(50, seed=1).draw(50) != PromptSampler(50, seed=2).draw(50)
    state = PromptSampler(7, seed=1).state_dict()
    with pytest.raises(ValueError, match="n=7"):
        PromptSampler(8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptSampler(7, seed=1).load_state_dict({**state, "pos": 9})
