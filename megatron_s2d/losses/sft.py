"""Token-level negative log-likelihood (SFT controls; also the sampled forward-KL warmup, see distill.py).

    loss = sum_{b,t} m_bt * (-log pi_theta(y_t|s_t)) / N_tokens    (global normaliser, see _common.LOSS_AGGS)
"""

from __future__ import annotations

import torch

from megatron_s2d.losses._common import aggregate, as_bool_mask, check_2d, check_shapes, zero_masked


def sft_loss(
    logprobs: torch.Tensor,  # (B, T) log pi_theta(y_t|s_t) of the target tokens, requires grad
    mask: torch.Tensor,  # (B, T) loss tokens
    global_num_tokens: float | torch.Tensor,
    *,
    loss_agg: str = "token_mean",
    global_num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL. Metrics: token_count, seq_count, nll_sum (per-token sum; see losses.metrics)."""
    check_2d("logprobs", logprobs)
    check_shapes(tuple(logprobs.shape), mask=mask)
    mask = as_bool_mask(mask)
    nll = -zero_masked(logprobs, mask)  # (B, T)
    loss = aggregate(nll, mask, loss_agg, global_num_tokens, global_num_seqs)
    with torch.no_grad():
        metrics = {
            "token_count": mask.sum().to(torch.float32),
            "seq_count": mask.any(dim=-1).sum().to(torch.float32),
            "nll_sum": nll.detach().sum().to(torch.float32),
        }
    return loss, metrics
