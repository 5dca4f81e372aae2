"""Distillation losses: forward KL (Stage 2a warmup on teacher samples) and top-k reverse KL (Stage 2b variant).

Forward KL, sum_t KL(pi_T(.|s_t) || pi_S(.|s_t)) on teacher samples y ~ pi_T:
  * sampled tokens only (`forward_kl_sampled`): E_{y~pi_T}[-log pi_S(y_t)] = KL + H(pi_T), so minimising the NLL of
    the teacher's tokens is the forward KL up to the (constant) teacher entropy = teacher-sample SFT.
  * top-k teacher log-probs (`forward_kl_topk`): sum_{v in top-k} p_T(v)(log p_T(v) - log p_S(v)) plus the tail
    term p_T^tail (log p_T^tail - log p_S^tail), p^tail = 1 - sum_{v in top-k} p(v).
Top-k reverse KL (`reverse_kl_topk`), on student samples over the student's top-k ids: the same with T and S swapped,
gradient flowing through p_S (the per-state reverse KL at the visited states; the dependence of the state
distribution on theta is not differentiated, as in GKD / top-k OPD).

Approximation: with the tail, the top-k loss is exactly KL between the (k+1)-bucket coarsenings of the two
distributions (k ids + "everything else"), which by the data-processing inequality is a lower bound on the full
KL, equal to it when k = V. Without the tail it is just the top-k partial sum (not a divergence): allowed for the
forward KL (it is then a cross-entropy on the teacher's top-k, which pulls the student's mass onto those ids), refused
for the reverse KL (the partial sum sum_{v in K} p_S(v) log(p_S(v) / p_T(v)) decreases by moving the student's mass
OUT of K, into the unpenalised tail: the wrong direction).
Tails: a model whose logits are at hand gives its tail exactly, as a log-sum-exp over the ids outside the k
(``policy.logprobs.tail_logprob``, vocab-parallel); pass it as ``student_log_tail`` / ``teacher_log_tail``. Its
gradient is then exact however small the tail: with a tail computed as 1 - sum(top-k) and floored, a collapsed student
tail (below the floor) received no restoring gradient and never recovered (fp64: tail-logit gradient +1e-8 with the
floor against -0.955 exact). Only a tail known solely through its top-k (the teacher's cached top-k log-probs of the
forward-KL warmup) is computed as log(-expm1(logsumexp_k)) and floored at ``tail_floor``: its fp32 rounding (~1e-6)
makes a smaller value noise; it carries no gradient (the teacher is fixed), so the floor only bounds a constant.
Masked positions may hold anything (padding, -inf): they are zeroed before use and get zero gradient.
Ids where the first distribution has zero mass (-inf log-prob) contribute 0; if the second distribution is -inf
where the first has mass, the KL is +inf (as it truly is) - the caller's NaN/inf loss check catches it.
"""

from __future__ import annotations

import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses._common import aggregate, as_bool_mask, check_2d, check_shapes, zero_masked
from megatron_s2d.losses.sft import sft_loss


def forward_kl_sampled(
    student_logprobs: torch.Tensor,  # (B, T) log pi_S of the teacher-sampled tokens, requires grad
    mask: torch.Tensor,  # (B, T)
    global_num_tokens: float | torch.Tensor,
    *,
    teacher_logprobs: torch.Tensor | None = None,  # (B, T) optional, only for the kl_sum metric
    loss_agg: str = "token_mean",
    global_num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NLL of teacher samples. Metrics: token_count, seq_count, nll_sum, and with teacher_logprobs kl_sum
    (sum of log p_T - log p_S, an unbiased per-token forward-KL estimate under teacher sampling)."""
    loss, metrics = sft_loss(
        student_logprobs, mask, global_num_tokens, loss_agg=loss_agg, global_num_seqs=global_num_seqs
    )
    if teacher_logprobs is not None:
        check_shapes(tuple(student_logprobs.shape), teacher_logprobs=teacher_logprobs)
        m = as_bool_mask(mask)
        with torch.no_grad():
            diff = zero_masked(teacher_logprobs, m) - zero_masked(student_logprobs.detach(), m)
            metrics["kl_sum"] = diff.sum().to(torch.float32)
    return loss, metrics


def _log_tail(logprobs_k: torch.Tensor, tail_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, K) log-probs -> (log of top-k mass (B, T), log of tail mass (B, T), floored at tail_floor)."""
    lse = torch.logsumexp(logprobs_k, dim=-1)
    tail = (-torch.expm1(lse)).clamp(min=tail_floor)  # 1 - exp(lse), accurate near lse = 0
    return lse, torch.log(tail)


def _tail_term(log_tail_p: torch.Tensor, log_tail_q: torch.Tensor) -> torch.Tensor:
    """p_tail (log p_tail - log q_tail) per position, 0 where p_tail = 0 (an empty tail: k = V), in forward and
    backward (no inf * 0)."""
    has = torch.isfinite(log_tail_p)
    lp = zero_masked(log_tail_p, has)
    lq = zero_masked(log_tail_q, has)
    return zero_masked(torch.exp(lp) * (lp - lq), has)


def _topk_kl(
    p_logprobs: torch.Tensor,  # (B, T, K) log p at the k ids (the distribution the KL is taken under)
    q_logprobs: torch.Tensor,  # (B, T, K) log q at the same ids
    mask: torch.Tensor,  # (B, T) bool
    tail: bool,
    tail_floor: float,
    p_log_tail: torch.Tensor | None = None,  # (B, T) exact log tail mass of p (else from its top-k, floored)
    q_log_tail: torch.Tensor | None = None,  # (B, T) exact log tail mass of q
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token KL(p || q) over k ids (+ tail bucket): returns (kl (B, T), log p top-k mass, log q top-k mass)."""
    m3 = mask[..., None]
    lp = zero_masked(p_logprobs, m3)
    lq = zero_masked(q_logprobs, m3)
    p = torch.exp(lp)
    # 0 * log 0 = 0 for ids with p = 0 (-inf entries or underflow): zero both logs there, so that no inf * 0
    # appears in the forward pass or the backward pass (a plain where() on the product would give NaN gradients).
    support = p > 0
    kl = (p * (zero_masked(lp, support) - zero_masked(lq, support))).sum(dim=-1)  # (B, T)
    lse_p, log_tail_p = _log_tail(lp, tail_floor)
    lse_q, log_tail_q = _log_tail(lq, tail_floor)
    if tail:
        if p_log_tail is not None:
            log_tail_p = zero_masked(p_log_tail, mask)
        if q_log_tail is not None:
            log_tail_q = zero_masked(q_log_tail, mask)
        kl = kl + _tail_term(log_tail_p, log_tail_q)
    return kl, lse_p, lse_q


def _check_topk(
    student: torch.Tensor, other_name: str, other: torch.Tensor, mask: torch.Tensor, floor: float
) -> None:
    if student.dim() != 3:
        raise S2DError(f"student_logprobs_at_ids: expected (B, T, K), got shape {tuple(student.shape)}")
    check_shapes(tuple(student.shape), **{other_name: other})
    check_2d("mask", mask)
    check_shapes(tuple(student.shape[:2]), mask=mask)
    if not 0.0 < floor < 1.0:
        raise S2DError(f"tail_floor: must be in (0, 1), got {floor}")


def forward_kl_topk(
    student_logprobs_at_ids: torch.Tensor,  # (B, T, K) log p_S at the teacher's top-k ids, requires grad
    teacher_topk_logprobs: torch.Tensor,  # (B, T, K) the teacher's top-k log-probs (full-vocab normalised)
    mask: torch.Tensor,  # (B, T)
    global_num_tokens: float | torch.Tensor,
    tail: bool = True,
    *,
    tail_floor: float = 1e-6,
    student_log_tail: torch.Tensor | None = None,  # (B, T) exact log of the student's mass outside the ids
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean top-k forward KL(p_T || p_S). The teacher's tail comes from its top-k (floored at ``tail_floor``);
    the student's from ``student_log_tail`` when given (exact gradient; see the module docstring), else from its
    log-probs at the ids. Metrics: token_count, kl_sum, teacher_topk_mass_sum, student_topk_mass_sum (student mass on
    the teacher's top-k ids)."""
    _check_topk(student_logprobs_at_ids, "teacher_topk_logprobs", teacher_topk_logprobs, mask, tail_floor)
    check_shapes(tuple(student_logprobs_at_ids.shape[:2]), student_log_tail=student_log_tail)
    mask = as_bool_mask(mask)
    kl, lse_t, lse_s = _topk_kl(
        teacher_topk_logprobs.detach(), student_logprobs_at_ids, mask, tail, tail_floor, q_log_tail=student_log_tail
    )
    loss = aggregate(kl, mask, "token_mean", global_num_tokens, None)
    return loss, _topk_metrics(kl, mask, teacher=lse_t, student=lse_s)


def reverse_kl_topk(
    student_logprobs_at_ids: torch.Tensor,  # (B, T, K) log p_S at the student's top-k ids, requires grad
    teacher_logprobs_at_ids: torch.Tensor,  # (B, T, K) log p_T at the same ids (full-vocab normalised)
    mask: torch.Tensor,  # (B, T)
    global_num_tokens: float | torch.Tensor,
    tail: bool = True,
    *,
    tail_floor: float = 1e-6,
    student_log_tail: torch.Tensor | None = None,  # (B, T) exact log of the student's mass outside the ids
    teacher_log_tail: torch.Tensor | None = None,  # (B, T) exact log of the teacher's mass outside the ids
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean top-k reverse KL(p_S || p_T) with the tail bucket, gradient through p_S (``tail=False`` is refused:
    see the module docstring). Tails are exact when given, else computed from the top-k log-probs (floored).
    Metrics: token_count, kl_sum, student_topk_mass_sum, teacher_topk_mass_sum (teacher mass on the student's top-k
    ids)."""
    if not tail:
        raise S2DError("reverse_kl_topk: tail=False would push the student's mass out of its top-k into the "
                       "unpenalised tail (the wrong direction); the top-k reverse KL needs the tail bucket")
    _check_topk(student_logprobs_at_ids, "teacher_logprobs_at_ids", teacher_logprobs_at_ids, mask, tail_floor)
    check_shapes(tuple(student_logprobs_at_ids.shape[:2]), student_log_tail=student_log_tail,
                 teacher_log_tail=teacher_log_tail)
    mask = as_bool_mask(mask)
    kl, lse_s, lse_t = _topk_kl(
        student_logprobs_at_ids, teacher_logprobs_at_ids.detach(), mask, tail, tail_floor,
        p_log_tail=student_log_tail,
        q_log_tail=None if teacher_log_tail is None else teacher_log_tail.detach(),
    )
    loss = aggregate(kl, mask, "token_mean", global_num_tokens, None)
    return loss, _topk_metrics(kl, mask, teacher=lse_t, student=lse_s)


def _topk_metrics(
    kl: torch.Tensor, mask: torch.Tensor, *, teacher: torch.Tensor, student: torch.Tensor
) -> dict[str, torch.Tensor]:
    """kl (B, T); teacher/student: (B, T) log of the top-k mass."""
    with torch.no_grad():
        out = {
            "token_count": mask.sum(),
            "kl_sum": zero_masked(kl.detach(), mask).sum(),
            "teacher_topk_mass_sum": zero_masked(torch.exp(teacher.detach()), mask).sum(),
            "student_topk_mass_sum": zero_masked(torch.exp(student.detach()), mask).sum(),
        }
        return {k: v.to(torch.float32) for k, v in out.items()}
