"""Rewards: the sparse math reward (math-verify behind a killable worker pool, or lm-eval's Hendrycks last-box
string equivalence in process: ``GRADERS``)."""

from megatron_s2d.rewards.extract import extract_answer
from megatron_s2d.rewards.math import (
    GRADERS,
    BatchResult,
    RewardStats,
    math_reward,
    score_batch,
    score_batch_with_stats,
)
from megatron_s2d.rewards.pool import shutdown_pool

__all__ = [
    "GRADERS",
    "BatchResult",
    "RewardStats",
    "extract_answer",
    "math_reward",
    "score_batch",
    "score_batch_with_stats",
    "shutdown_pool",
]
