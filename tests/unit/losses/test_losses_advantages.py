"""Advantage estimators vs slow per-group Python references."""

import math

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses import dynamic_sampling_keep, grpo_advantages, opd_token_advantages


def _ref_grpo(rewards, g, scale_by_std, eps):
    out, flags = [], []
    r = [float(x) for x in rewards]
    for n in range(len(r) // g):
        grp = r[n * g : (n + 1) * g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1)) if g > 1 else 0.0
        zero = max(grp) == min(grp)
        flags.append(zero)
        for x in grp:
            a = 0.0 if zero else (x - mean) / ((std + eps) if scale_by_std else 1.0)
            out.append(a)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(flags)


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("g", [1, 2, 5])
def test_grpo_matches_reference(scale_by_std, g):
    gen = torch.Generator().manual_seed(g)
    rewards = torch.randint(0, 2, (6 * g,), generator=gen).double()
    rewards[:g] = torch.rand(g, generator=gen, dtype=torch.float64)  # one group of continuous rewards
    res = grpo_advantages(rewards, g, scale_by_std=scale_by_std, eps=1e-6)
    ref_adv, ref_flags = _ref_grpo(rewards, g, scale_by_std, 1e-6)
    torch.testing.assert_close(res.advantages, ref_adv)
    assert torch.equal(res.zero_variance_groups, ref_flags)
    assert res.advantages.shape == (6 * g,) and res.group_mean.shape == (6,) and res.group_std.shape == (6,)


def test_zero_variance_groups_are_zero_and_flagged():
    # In fp32 mean([0.3] * 7) != 0.3 (off by ~3e-8), which divided by (std 0 + eps 1e-6) would give |A| ~ 0.03:
    # zero-variance advantages must be exactly 0 anyway.
    g = 7
    rewards = torch.tensor([0.3] * g + [1.0, 0.0] + [1.0] * (g - 2) + [1.0] * g, dtype=torch.float32)
    res = grpo_advantages(rewards, g)
    assert res.zero_variance_groups.tolist() == [True, False, True]
    assert res.num_zero_variance == 2
    assert torch.all(res.advantages[:g] == 0) and torch.all(res.advantages[2 * g :] == 0)
    assert torch.all(res.advantages[g : 2 * g] != 0)
    assert dynamic_sampling_keep(rewards, g).tolist() == [False, True, False]


def test_grpo_int_and_bool_rewards():
    res = grpo_advantages(torch.tensor([True, False, False, False]), 2)
    assert res.advantages.dtype == torch.float32
    assert res.advantages[0] > 0 > res.advantages[1] and res.zero_variance_groups.tolist() == [False, True]
    # deviations +-0.5, sample std sqrt(0.5) -> +-1/sqrt(2) (population std 0.5 would give +-1)
    torch.testing.assert_close(res.advantages[:2], torch.tensor([1.0, -1.0]) / math.sqrt(2), atol=1e-5, rtol=0)


def test_grpo_errors():
    with pytest.raises(S2DError, match="not divisible by group_size"):
        grpo_advantages(torch.zeros(7), 4)
    with pytest.raises(S2DError, match="rewards"):
        grpo_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(S2DError, match="group_size"):
        dynamic_sampling_keep(torch.zeros(4), 0)


def test_opd_advantages_sign_masking_and_reward():
    teacher = torch.tensor([[-1.0, -3.0, float("-inf")], [-0.5, -0.5, float("nan")]])
    student = torch.tensor([[-2.0, -1.0, -1.0], [-0.5, -2.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = opd_token_advantages(teacher, student, mask)
    expected = torch.tensor([[1.0, -2.0, 0.0], [0.0, 2.0, 0.0]])
    assert torch.equal(adv, expected)  # teacher likes the token more -> positive; masked -> exactly 0
    assert not adv.requires_grad
    # the task reward enters through its group baseline (GRPO advantage within the prompt's 2 samples), not raw:
    # rewards (1, 0) -> advantages (+0.707, -0.707) with the sample std, times the coefficient, on every token
    adv_r = opd_token_advantages(teacher, student, mask, task_reward=torch.tensor([1.0, 0.0]), task_reward_coef=0.5,
                                 group_size=2)
    a = 0.5 * (0.5 / (2 ** 0.5 / 2 + 1e-6))
    torch.testing.assert_close(adv_r, expected + torch.tensor([[a, a, 0.0], [-a, -a, 0.0]]))
    # a group where every sample is right (or wrong) adds nothing: no length-proportional bonus for being right
    same = opd_token_advantages(teacher, student, mask, task_reward=torch.tensor([1.0, 1.0]), task_reward_coef=0.5,
                                group_size=2)
    assert torch.equal(same, expected)


def test_opd_advantages_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(S2DError, match="task_reward"):
        opd_token_advantages(x, x, x, task_reward_coef=1.0)
    with pytest.raises(S2DError, match="student_logprobs"):
        opd_token_advantages(x, torch.zeros(2, 4), x)
    with pytest.raises(S2DError, match="task_reward"):
        opd_token_advantages(x, x, x, task_reward=torch.zeros(3), task_reward_coef=1.0)
