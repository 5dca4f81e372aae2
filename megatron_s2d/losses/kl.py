"""Sampled-token KL estimators (Schulman, "Approximating KL divergence", 2020).

For tokens sampled from pi (log-prob `logp`) and a second policy q (log-prob `ref_logp`), with log r = ref - logp:
    k1 = -log r                 unbiased, high variance, can be negative
    k2 = 0.5 (log r)^2          biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0   (GRPO's KL(pi_theta || pi_ref) penalty)
All estimate KL(pi || q) per token. log r is clamped to [-20, 20] before exp (as verl does) so one extreme token
cannot overflow fp32; inside that range the values and gradients are exact.
"""

from __future__ import annotations

import torch

from megatron_s2d.errors import S2DError

LOG_RATIO_CLAMP = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3")


def sampled_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Elementwise KL(pi || ref) estimate at sampled tokens; same shape as the inputs, gradient flows through both."""
    if estimator not in KL_ESTIMATORS:
        raise S2DError(f"estimator: must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_r = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    return torch.expm1(log_r) - log_r  # exp(x) - 1 - x, expm1 keeps it accurate (and >= 0) near 0
