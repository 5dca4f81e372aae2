"""Pure-torch losses and advantage estimators (no distributed code). See each module's docstring for the maths."""

from megatron_s2d.losses._common import LOSS_AGGS
from megatron_s2d.losses.advantages import (
    GroupAdvantages,
    dynamic_sampling_keep,
    grpo_advantages,
    opd_token_advantages,
)
from megatron_s2d.losses.distill import forward_kl_sampled, forward_kl_topk, reverse_kl_topk
from megatron_s2d.losses.kl import sampled_kl
from megatron_s2d.losses.metrics import finalize_metrics, merge_metrics, metric_reduce_op
from megatron_s2d.losses.policy_gradient import clipped_pg_loss
from megatron_s2d.losses.rollout_correction import RolloutCorrection, rollout_is_weights
from megatron_s2d.losses.sft import sft_loss

__all__ = [
    "LOSS_AGGS",
    "GroupAdvantages",
    "clipped_pg_loss",
    "dynamic_sampling_keep",
    "finalize_metrics",
    "forward_kl_sampled",
    "forward_kl_topk",
    "grpo_advantages",
    "merge_metrics",
    "metric_reduce_op",
    "RolloutCorrection",
    "opd_token_advantages",
    "rollout_is_weights",
    "reverse_kl_topk",
    "sampled_kl",
    "sft_loss",
]
