"""Rollout importance-sampling corrections: the engine that sampled is not exactly the policy that trains.

The rollout engine (vLLM in bf16, other kernels, FP8, a stale copy) samples from pi_engine; the clipped policy
gradient is taken w.r.t. the trainer's own log-probs at sampling time, pi_old (``old_logprobs``, recomputed by the
trainer). The per-token ratio r_t = pi_old(y_t|s_t) / pi_engine(y_t|s_t) measures the mismatch; these corrections
turn it into a per-token weight w_t (detached) that multiplies the policy-gradient term of each token:

    mode "tis"           token-level truncated IS:  w_t = min(r_t, cap)                   (Yao et al. 2025; verl)
    mode "mis"           geometric rejection (verl's geo-RS): w_t = 1 if g = exp(mean_t log r_t) is in [low, high],
                         else 0, for every token of the sequence. Kept sequences get weight 1: the mode only drops
                         sequences, it does not reweight the kept ones. The geometric mean does not drop long
                         sequences for their length, but it moves slowly: it leaves [0.5, 2] only when the mean
                         per-token log r exceeds ln 2 in size, so the band must be tight (the plan's default is
                         verl's [0.999, 1.001]; see ``config.schema.RolloutCorrectionConfig``)
    mode "seq_mask_tis"  the same rejection; kept sequences get w_t = min(r_t, cap) (NeMo-RL's seq-mask-tis, whose
                         token weights are not truncated)
    mode "icepop"        token masking (IcePop, Ring-1T): w_t = r_t if r_t in [low, high] else 0
    mode "none"          w_t = 1

With identical engine and trainer log-probs r_t = exp(0) = 1 exactly, so every mode gives w_t = 1.0 exactly: an exact
no-op. Masked tokens keep their place in the loss's normaliser (they contribute 0), as in verl. Shapes: (B, T) in,
(B, T) out; masked-out positions (``mask`` = 0) get weight 0 and are not counted in the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses._common import as_bool_mask, check_2d, check_shapes, zero_masked

MODES = ("none", "tis", "mis", "seq_mask_tis", "icepop")
SEQUENCE_MODES = ("mis", "seq_mask_tis")  # reject whole sequences by their geometric-mean ratio
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class RolloutCorrection:
    """A mode and its thresholds (see the module docstring). ``low`` / ``high`` are the band of the mode: of a
    sequence's geometric-mean ratio for mis / seq_mask_tis, of each token's ratio for icepop. The defaults here are
    IcePop's band; a plan keeps one band per mode (``config.schema.RolloutCorrectionConfig``: mis's is far tighter)
    and ``stages.steps.correction`` passes the mode's."""

    mode: str = "none"
    tis_cap: float = 2.0  # tis, seq_mask_tis
    low: float = 0.5
    high: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise S2DError(f"rollout correction mode: expected one of {MODES}, got {self.mode!r}")
        if not self.tis_cap > 0 or not 0 <= self.low <= 1 <= self.high:
            raise S2DError(f"rollout correction: tis_cap must be > 0 and low <= 1 <= high (got cap {self.tis_cap}, "
                           f"band [{self.low}, {self.high}])")


def rollout_is_weights(
    old_logprobs: torch.Tensor,  # (B, T) log pi_old: the trainer's log-probs of the sampled tokens at sampling time
    engine_logprobs: torch.Tensor,  # (B, T) log pi_engine: what the rollout engine recorded when it sampled them
    mask: torch.Tensor,  # (B, T) loss tokens
    correction: RolloutCorrection,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weights (B, T) detached, metrics sums): is_weight_sum, is_weight_max, is_masked_count (per-token, over mask)."""
    check_2d("old_logprobs", old_logprobs)
    check_shapes(tuple(old_logprobs.shape), engine_logprobs=engine_logprobs, mask=mask)
    m = as_bool_mask(mask)
    with torch.no_grad():
        log_r = zero_masked((old_logprobs.detach() - engine_logprobs.detach()).double(), m)
        log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_r)  # (B, T); exactly 1 where the log-probs agree
        mode = correction.mode
        if mode == "none":
            w = torch.ones_like(ratio)
        elif mode == "tis":
            w = ratio.clamp(max=correction.tis_cap)
        elif mode in SEQUENCE_MODES:
            n = m.sum(-1).clamp(min=1)
            seq = torch.exp(log_r.sum(-1) / n)  # (B,) geometric-mean ratio of each sequence
            keep = ((seq >= correction.low) & (seq <= correction.high))[:, None].to(ratio.dtype)  # (B, 1)
            w = keep.expand_as(ratio) if mode == "mis" else keep * ratio.clamp(max=correction.tis_cap)
        else:  # icepop
            inside = (ratio >= correction.low) & (ratio <= correction.high)
            w = torch.where(inside, ratio, torch.zeros_like(ratio))
        w = zero_masked(w, m).to(old_logprobs.dtype)
        metrics = {
            "is_weight_sum": w.sum().float(),
            "is_weight_max": (w.max() if w.numel() else w.new_zeros(())).float(),
            "is_masked_count": (m & (w == 0)).sum().float(),
        }
    return w, metrics
