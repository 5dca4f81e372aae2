"""Sampled-token KL estimators (Schulman, "Approximating KL divergence", 2020).

For tokens sampled from pi (log-prob `logp`) and a second policy q (log-prob `ref_logp`), with log r = ref - logp:
    k1 = -log r                 unbiased, high variance, can be negative
    k2 = 0.5 (log r)^2          biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0   (GRPO's KL(pi_theta || pi_ref) penalty)
All estimate KL(pi || q) per token. log r is clamped to [-20, 20] before exp (as verl does) so one extreme token
cannot overflow fp32; inside that range the values and gradients are exact. That alone still lets one token
contribute e^20 ~ 5e8 through k3, so the estimate itself is also clamped to [-clamp, clamp] when ``clamp`` is given
(verl clamps its k3 "low_var_kl" to [-10, 10]); a clamped token passes no gradient.
"""

from __future__ import annotations

import torch

from megatron_s2d.errors import S2DError

LOG_RATIO_CLAMP = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3")


def sampled_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3",
               clamp: float | None = None) -> torch.Tensor:
    """Elementwise KL(pi || ref) estimate at sampled tokens; same shape as the inputs, gradient flows through both.
    ``clamp``: clamp each estimate to [-clamp, clamp] (None: no clamp)."""
    if estimator not in KL_ESTIMATORS:
        raise S2DError(f"estimator: must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None and not clamp > 0:
        raise S2DError(f"clamp: must be > 0 (or None), got {clamp}")
    log_r = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * log_r.square()
    else:
        kl = torch.expm1(log_r) - log_r  # exp(x) - 1 - x, expm1 keeps it accurate (and >= 0) near 0
    return kl if clamp is None else kl.clamp(-clamp, clamp)
