"""Rollout-engine vs trainer log-prob mismatch: the numbers logged every step to watch the engine drift off-policy.

Both inputs are per-token log-probs of the *same sampled tokens* at the same temperature (``rollout.base``
convention): ``engine`` from the rollout engine at generation time, ``trainer`` from the policy's teacher-forced
forward. With d = trainer - engine (= log pi_train / pi_engine) and r = exp(d), over the masked tokens:

- ``mean_abs_diff``, ``max_abs_diff``, ``mean_diff``: |d| averaged / maximal, and d signed;
- ``ratio_mean_minus_1``: mean(r) - 1. Samples come from the engine, so E[r] = 1 exactly when both are proper
  distributions over the same support: a non-zero value is the bias an importance weight would correct;
- ``k3_kl``: mean(r - 1 - d), Schulman's k3 estimator of KL(pi_engine || pi_trainer) (unbiased, every term >= 0);
- ``n_tokens``: how many tokens were compared.
Computed in float64 so that exp(d) cannot overflow for any realistic gap.
"""

from __future__ import annotations

import torch

from megatron_s2d.errors import S2DError

__all__ = ["logprob_mismatch"]


def logprob_mismatch(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """Mismatch statistics between engine and trainer log-probs of the same tokens (see the module docstring).

    Args:
        engine_logprobs: (B, T) log-probs recorded by the rollout engine.
        trainer_logprobs: (B, T) log-probs from the trainer's forward (may require grad; it is detached).
        mask: (B, T) bool or float, nonzero on the response tokens to compare.

    Returns:
        dict of python floats: mean_abs_diff, max_abs_diff, mean_diff, ratio_mean_minus_1, k3_kl, n_tokens.
    """
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != mask.shape:
        raise S2DError(f"logprob_mismatch: shapes differ: engine_logprobs {tuple(engine_logprobs.shape)}, "
                       f"trainer_logprobs {tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    keep = mask.detach() != 0  # (B, T)
    n = int(keep.sum())
    if n == 0:
        raise S2DError("logprob_mismatch: mask selects no tokens")
    e = engine_logprobs.detach().to(torch.float64)[keep]  # (N,)
    t = trainer_logprobs.detach().to(torch.float64)[keep]  # (N,)
    for name, x in (("engine_logprobs", e), ("trainer_logprobs", t)):
        if not torch.isfinite(x).all():
            raise S2DError(f"logprob_mismatch: {name} has non-finite values at masked tokens")
    d = t - e  # (N,) log pi_train - log pi_engine
    r = torch.exp(d)  # (N,)
    return {
        "mean_abs_diff": d.abs().mean().item(),
        "max_abs_diff": d.abs().max().item(),
        "mean_diff": d.mean().item(),
        "ratio_mean_minus_1": (r.mean() - 1.0).item(),
        "k3_kl": (r - 1.0 - d).mean().item(),
        "n_tokens": float(n),
    }
