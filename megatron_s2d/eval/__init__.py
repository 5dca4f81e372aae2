"""Evaluation metrics: avg@k with standard error across problems, unbiased pass@k."""

from megatron_s2d.eval.metrics import AvgAtK, avg_at_k, pass_at_k, pass_at_k_single

__all__ = ["AvgAtK", "avg_at_k", "pass_at_k", "pass_at_k_single"]
