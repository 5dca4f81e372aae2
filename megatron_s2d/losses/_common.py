"""Shared input checks and loss aggregation for the loss functions (private helpers).

Aggregation follows NeMo-RL: every loss receives *global* normalisers (the number of loss tokens / sequences over
the whole optimiser step, across micro-batches and data-parallel ranks), so the per-micro-batch losses SUM to the
full-batch objective. A sequence (row) must never be split across micro-batches for the sequence-mean modes.
"""

from __future__ import annotations

import torch

from megatron_s2d.errors import S2DError

# token_mean:          sum_{b,t} m_bt l_bt / N_tokens                       (DAPO token-level mean)
# seq_mean_token_mean: sum_b [ sum_t m_bt l_bt / sum_t m_bt ] / N_seqs      (GRPO paper, per-sequence mean)
# seq_mean_token_sum:  sum_b [ sum_t m_bt l_bt ] / N_seqs                   (per-sequence sum, mean over sequences)
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def check_shapes(expected: tuple[int, ...], **tensors: torch.Tensor | None) -> None:
    """Raise S2DError naming the first tensor whose shape is not `expected` (None entries are skipped)."""
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(expected):
            raise S2DError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise S2DError(f"{name}: expected a (B, T) tensor, got shape {tuple(t.shape)}")


def check_normaliser(name: str, value: float | torch.Tensor | None) -> None:
    """A global normaliser must be a positive count. Tensors are not inspected (that would force a device sync)."""
    if value is None:
        raise S2DError(f"{name}: required for this loss aggregation, got None")
    if not isinstance(value, torch.Tensor) and not value > 0:
        raise S2DError(f"{name}: must be > 0 (global count over the step), got {value}")


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool/float mask -> bool; any non-zero entry counts as a loss token."""
    return mask if mask.dtype == torch.bool else mask != 0


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace masked-out entries by 0 so NaN/inf padding can neither poison the sum nor the gradient.

    `mask` broadcasts against `x` (e.g. (B, T, 1) against (B, T, K)).
    """
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def aggregate(
    per_token: torch.Tensor,  # (B, T), any values at masked positions
    mask: torch.Tensor,  # (B, T) bool
    loss_agg: str,
    global_num_tokens: float | torch.Tensor | None,
    global_num_seqs: float | torch.Tensor | None,
) -> torch.Tensor:
    """Reduce a per-token loss to this micro-batch's share of the global objective (see LOSS_AGGS)."""
    if loss_agg not in LOSS_AGGS:
        raise S2DError(f"loss_agg: must be one of {LOSS_AGGS}, got {loss_agg!r}")
    per_token = zero_masked(per_token, mask)
    if loss_agg == "token_mean":
        check_normaliser("global_num_tokens", global_num_tokens)
        return per_token.sum() / global_num_tokens
    check_normaliser("global_num_seqs", global_num_seqs)
    seq_total = per_token.sum(dim=-1)  # (B,)
    if loss_agg == "seq_mean_token_mean":
        # Rows without loss tokens contribute 0 (clamp avoids 0/0); the caller decides whether they count in N_seqs.
        seq_total = seq_total / mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)
    return seq_total.sum() / global_num_seqs
