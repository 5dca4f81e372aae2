"""Advantage estimators: GRPO group-normalised rewards, DAPO dynamic-sampling filter, OPD per-token advantages.

Layout: `rewards` is flat (N*G,) with the G samples of prompt n contiguous at [n*G, (n+1)*G).

GRPO (DeepSeekMath, Shao et al. 2024, eq. in sec. 4.1.2, outcome supervision):
    A_i = (r_i - mean_G r) / (std_G r + eps)
std_G is the SAMPLE standard deviation (Bessel's correction, n-1), as in TRL's GRPOTrainer and verl's GRPO
estimator (both call torch.std); the paper does not say which. `scale_by_std=False` gives Dr. GRPO's
A_i = r_i - mean_G r (Liu et al. 2025). A group whose rewards are all equal carries no signal: its advantages are
exactly zero (not just ~0 from rounding) and it is flagged, so the caller can count/log it or drop it (DAPO
dynamic sampling, Yu et al. 2025). With G = 1 every group is zero-variance.

OPD (on-policy distillation): on student samples the dense reward is log pi_T(y_t|s_t); with the entropy bonus
of max-entropy RL the per-token advantage is the sampled reverse-KL term
    a_t = log pi_T(y_t|s_t) - log pi_S(y_t|s_t)   (+ coef * A_i, optional)
where pi_S is the behaviour (sampling) policy, so a_t is a constant (no gradient). No clamping is applied.
The optional sparse task reward r_i in {0, 1} enters through its GRPO advantage over the prompt's G samples,
A_i = (r_i - mean_G r) / (std_G r + eps), broadcast to every token of sample i: a group baseline. Adding the raw
reward coef * r_i instead would shift every token of every correct sample by the same constant (a baseline-free
REINFORCE term whose variance grows with the response length and which rewards length when most samples are right).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses._common import as_bool_mask, check_2d, check_shapes, zero_masked


@dataclass(frozen=True)
class GroupAdvantages:
    """Result of `grpo_advantages` (N prompts, G samples each)."""

    advantages: torch.Tensor  # (N*G,) one scalar per sample, broadcast over its tokens by the loss
    zero_variance_groups: torch.Tensor  # (N,) bool, True where all G rewards are equal (advantages are 0)
    group_mean: torch.Tensor  # (N,)
    group_std: torch.Tensor  # (N,) sample std (n-1); 0 when G == 1

    @property
    def num_zero_variance(self) -> int:
        return int(self.zero_variance_groups.sum())


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N*G,) -> (N, G) float view, with clear errors."""
    if rewards.dim() != 1:
        raise S2DError(f"rewards: expected a flat (N*G,) tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise S2DError(f"group_size: must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise S2DError(
            f"rewards: length {rewards.numel()} is not divisible by group_size {group_size} "
            "(expected N prompts x G samples, contiguous per prompt)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    return rewards.view(-1, group_size)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> GroupAdvantages:
    """GRPO advantages. rewards: (N*G,) -> GroupAdvantages with advantages (N*G,)."""
    grouped = _grouped(rewards, group_size)  # (N, G)
    mean = grouped.mean(dim=1)  # (N,)
    if group_size > 1:
        std = grouped.std(dim=1, correction=1)  # (N,)
    else:
        std = torch.zeros_like(mean)
    zero_var = grouped.amax(dim=1) == grouped.amin(dim=1)  # (N,) exact: mean/std rounding cannot hide it
    adv = grouped - mean[:, None]  # (N, G)
    if scale_by_std:
        adv = adv / (std[:, None] + eps)
    adv = torch.where(zero_var[:, None], torch.zeros_like(adv), adv)
    return GroupAdvantages(
        advantages=adv.reshape(-1), zero_variance_groups=zero_var, group_mean=mean, group_std=std
    )


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: (N*G,) rewards -> (N,) bool, True for groups whose rewards are not all equal."""
    grouped = _grouped(rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def opd_token_advantages(
    teacher_logprobs: torch.Tensor,  # (B, T) log pi_T(y_t | s_t) of the sampled tokens
    student_logprobs: torch.Tensor,  # (B, T) log pi_S(y_t | s_t) under the behaviour policy
    mask: torch.Tensor,  # (B, T) loss tokens
    task_reward: torch.Tensor | None = None,  # (B,) sparse sequence reward, B = N prompts x group_size, grouped
    task_reward_coef: float = 0.0,
    group_size: int = 1,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Per-token OPD advantages (B, T), detached, exactly 0 at masked positions (whatever the inputs hold there).
    With a task reward: + task_reward_coef * (GRPO advantage of the reward within each group of ``group_size``)."""
    check_2d("teacher_logprobs", teacher_logprobs)
    check_shapes(tuple(teacher_logprobs.shape), student_logprobs=student_logprobs, mask=mask)
    if task_reward_coef != 0.0 and task_reward is None:
        raise S2DError(f"task_reward: required when task_reward_coef is {task_reward_coef}, got None")
    mask = as_bool_mask(mask)
    adv = teacher_logprobs.detach() - student_logprobs.detach()  # (B, T)
    if task_reward is not None and task_reward_coef != 0.0:
        check_shapes((teacher_logprobs.shape[0],), task_reward=task_reward)
        group = grpo_advantages(task_reward.detach().to(adv.dtype), group_size, scale_by_std=scale_by_std)
        adv = adv + task_reward_coef * group.advantages.to(adv.dtype)[:, None]
    return zero_masked(adv, mask)
