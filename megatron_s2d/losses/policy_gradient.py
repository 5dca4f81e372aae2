"""Clipped policy-gradient (PPO/GRPO surrogate) loss, used by GRPO (Stages 1, 3) and OPD (Stage 2b).

Per token (PPO, Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3):
    rho_t = exp(log pi_theta(y_t|s_t) - log pi_old(y_t|s_t))
    l_t   = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)      (eps_low != eps_high: DAPO clip-higher)
          [+ for A_t < 0 with dual_clip_c = c > 1:  l_t = min(l_t, -c A_t)   (dual clip, Ye et al. 2020)]
          [x w_t, a rollout importance weight (``rollout_correction``), on the clipped term only]
          + kl_beta * min(k3(pi_theta || pi_ref)_t, kl_clamp)                  (optional, GRPO's KL penalty)
then aggregated with global normalisers (see `_common.LOSS_AGGS`): summing the returned loss over micro-batches
and data-parallel ranks gives the full-batch objective. NOTE for the caller: data-parallel gradient *averaging*
(Megatron DDP's default) divides by dp_size; either sum gradients or multiply the loss by dp_size.

GRPO passes one advantage per sequence, shape (B,); OPD passes per-token advantages (B, T).
Deviation from the GRPO paper: the KL term is the k3 estimator on the sampled token (as in the paper), but
log(pi_ref/pi_theta) and log rho are clamped to [-20, 20] before exp, and the k3 value itself to ``kl_clamp``
(default 10), as verl does, so a single extreme token can neither overflow nor dominate the batch.
Inputs are NOT checked for NaN/inf at loss positions (that costs a device sync; the caller checks the loss).
Masked positions may hold anything (padding, -inf): they are zeroed before use and get zero gradient.
"""

from __future__ import annotations

import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses._common import aggregate, as_bool_mask, check_2d, check_shapes, zero_masked
from megatron_s2d.losses.kl import LOG_RATIO_CLAMP, sampled_kl


def clipped_pg_loss(
    logprobs: torch.Tensor,  # (B, T) log pi_theta(y_t|s_t), requires grad
    old_logprobs: torch.Tensor,  # (B, T) log pi_old(y_t|s_t) (behaviour policy at sampling time)
    advantages: torch.Tensor,  # (B, T) per token, or (B,) per sequence
    mask: torch.Tensor,  # (B, T) loss tokens (bool, or float with non-zero = counts)
    *,
    global_num_tokens: float | torch.Tensor,
    global_num_seqs: float | torch.Tensor | None = None,
    loss_agg: str = "token_mean",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,  # (B, T) log pi_ref(y_t|s_t)
    kl_beta: float = 0.0,
    kl_clamp: float | None = 10.0,
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,  # (B, T) detached rollout importance weights (losses.rollout_correction)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss; returns (scalar loss, metrics). See module docstring and `losses.metrics`.

    global_num_tokens: loss tokens in the whole step (all micro-batches, all DP ranks); used by "token_mean".
    global_num_seqs: sequences in the whole step; required by the "seq_mean_*" aggregations.
    Metrics (per-token sums, normalise by token_count; *_max by max):
        token_count, seq_count, pg_loss_sum (unclipped-or-clipped surrogate, no KL), ratio_sum, ratio_max,
        clip_low_count (A<0, rho<1-eps_low: clipped, zero gradient), clip_high_count (A>0, rho>1+eps_high),
        dual_clip_count (A<0, rho>c; only with dual_clip_c), kl_sum (k3 vs ref; only with ref_logprobs).
    """
    check_2d("logprobs", logprobs)
    shape = tuple(logprobs.shape)
    check_shapes(shape, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs, is_weights=is_weights)
    if advantages.dim() == 1:
        check_shapes(shape[:1], advantages=advantages)
        advantages = advantages[:, None].expand(shape)
    else:
        check_shapes(shape, advantages=advantages)
    if not (eps_low >= 0 and eps_high >= 0):
        raise S2DError(f"eps_low/eps_high: must be >= 0, got {eps_low}, {eps_high}")
    if eps_low >= 1:
        raise S2DError(f"eps_low: must be < 1 (lower clip bound 1 - eps_low > 0), got {eps_low}")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise S2DError(f"dual_clip_c: must be > 1 (or None), got {dual_clip_c}")
    if kl_beta != 0.0 and ref_logprobs is None:
        raise S2DError(f"ref_logprobs: required when kl_beta is {kl_beta}, got None")

    mask = as_bool_mask(mask)
    logp = zero_masked(logprobs, mask)
    old = zero_masked(old_logprobs.detach(), mask)
    adv = zero_masked(advantages.detach().to(logp.dtype), mask)

    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)  # (B, T) = -min(rho A, clip(rho) A)
    if dual_clip_c is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip_c * adv), per_token)
    if is_weights is not None:
        per_token = per_token * zero_masked(is_weights.detach().to(per_token.dtype), mask)
    pg_per_token = per_token

    kl = None
    if ref_logprobs is not None:
        kl = sampled_kl(logp, zero_masked(ref_logprobs.detach(), mask), "k3", clamp=kl_clamp)  # (B, T)
        if kl_beta != 0.0:
            per_token = per_token + kl_beta * kl

    loss = aggregate(per_token, mask, loss_agg, global_num_tokens, global_num_seqs)

    with torch.no_grad():
        m = mask
        r = ratio.detach()
        metrics = {
            "token_count": m.sum(),
            "seq_count": m.any(dim=-1).sum(),
            "pg_loss_sum": zero_masked(pg_per_token.detach(), m).sum(),
            "ratio_sum": zero_masked(r, m).sum(),
            "ratio_max": zero_masked(r, m).max() if r.numel() else r.new_zeros(()),
            "clip_low_count": (m & (adv < 0) & (r < 1.0 - eps_low)).sum(),
            "clip_high_count": (m & (adv > 0) & (r > 1.0 + eps_high)).sum(),
        }
        if dual_clip_c is not None:
            metrics["dual_clip_count"] = (m & (adv < 0) & (r > dual_clip_c)).sum()
        if kl is not None:
            metrics["kl_sum"] = zero_masked(kl.detach(), m).sum()
        metrics = {k: v.to(torch.float32) for k, v in metrics.items()}
    return loss, metrics
