"""Objectives: glue between vocab-parallel logits and the pure losses in ``megatron_s2d.losses``.

An objective is ``(logits_shard (B, T, V/tp), micro_batch) -> (loss, metrics)``; the policy runs it inside megatron's
pipeline schedule on the last stage. Token alignment: ``logits[:, t-1]`` predicts ``tokens[:, t]``; all per-token
fields of a micro-batch (``loss_mask``, ``old_logprobs``, ``advantages``, ``teacher_*``...) are indexed by the
position of the *predicted* token, with position 0 unused.

A packed micro-batch (``batching.pack_rows``) comes with (1, S, V/tp) logits of its sequences back to back; the
log-prob pass runs on the packed logits (no padding) and its results are mapped back to the per-row layout, so the
losses always see (B, T) tensors.

Micro-batch keys: ``tokens`` (B,T) long, ``lengths`` (B,), ``loss_mask`` (B,T) float, plus per objective:
  pg (GRPO / OPD):     ``old_logprobs`` (B,T), ``advantages`` (B,T), optional ``ref_logprobs`` (B,T)
  fkl_topk:            ``topk_ids`` (B,T,K) long, ``topk_logprobs`` (B,T,K): the teacher's (it generated the rows)
  rkl_topk (OPD top-k): ``topk_ids`` (B,T,K): the student's, ``teacher_logprobs_at_ids`` (B,T,K), ``teacher_log_tail``
(the field names of ``policy.batch.RolloutBatch``). The stage loops describe a loss with one of the frozen dataclasses
at the end (:class:`PolicyGradientLoss`, :class:`ForwardKLLoss`, :class:`ReverseKLTopkLoss`); the policy binds it to
its tensor-parallel group and the step's global normalisers (``Loss.objective``), so no process group reaches a loop.

Temperature: one convention for every objective, the rollout temperature T. Both models are compared as
softmax(z / T): the student's log-probs in every loss, the teacher's scores (``logprob_values(temperature=T)``), the
cached teacher top-k (the engines record log softmax(z / T)), and PPO's old log-probs. Tempering is the same bijection
on both sides (softmax(z_S / T) = softmax(z_T / T) iff z_S = z_T up to a constant), so every distillation objective
is minimised exactly at pi_S = pi_T, for any T > 0, and the forward-KL warmup, sampled OPD and top-k OPD all aim at
the same student. On student samples drawn at T the sampled reverse KL is then on-policy for the tempered student.
(Comparing the student at T with the teacher at 1, as sampled OPD once did, makes the optimum pi_S proportional to
pi_T^T: flatter than the teacher for T < 1.) TRL's GKD divides the student's and the teacher's logits by the same
temperature as well. T = 0 (greedy) is refused for training stages when the plan is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from megatron_s2d import losses
from megatron_s2d.losses.rollout_correction import RolloutCorrection, rollout_is_weights
from megatron_s2d.policy.logprobs import tail_logprob, token_logprobs, topk_logprobs


# fp32 work elements per chunk of the log-prob pass (2^28 = 1 GiB per work buffer): rows of logits are processed this
# many elements at a time, so the pass needs O(1 GiB) of temporaries whatever the micro-batch (16k tokens x 128k vocab
# of bf16 logits is 4 GiB; an unchunked fp32 copy would add 8 GiB), and reuses its buffers across chunks
CHUNK_ELEMS = 1 << 28


def chunk_rows(logits: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMS // logits.shape[-1])


def shifted(values: torch.Tensor) -> torch.Tensor:
    """Put per-position values computed from logits[:, :-1] at the predicted-token positions 1..T-1 (pad 0)."""
    pad = torch.zeros_like(values[:, :1])
    return torch.cat([pad, values], dim=1)


# ----------------------------------------------------------------------------- packed micro-batches (batching.pack_rows)
def is_packed(mb: dict) -> bool:
    return "pack_index" in mb


def to_packed(rows: torch.Tensor, mb: dict) -> torch.Tensor:
    """(n, T, ...) per-row values -> (1, S, ...) in the micro-batch's packed order."""
    valid = mb["pack_valid"]
    return rows[valid].unsqueeze(0)


def from_packed(packed: torch.Tensor, mb: dict) -> torch.Tensor:
    """(1, S, ...) values at packed positions -> (n, T, ...) per row; position 0 of every row (predicted by the
    previous sequence's last token) and positions past a row's length are zero. Differentiable."""
    keep = mb["pack_valid"].clone()
    keep[:, 0] = False
    out = packed[0][mb["pack_index"]]  # (n, T, ...)
    return out * keep.view(*keep.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def _next_targets(mb: dict, ids_key: str | None) -> torch.Tensor:
    """What each position's logits predict: the next token (or ``mb[ids_key]`` at the next position), with a dummy id
    0 after the last position. Working on all T logit positions (and dropping the last value) instead of slicing
    ``logits[:, :-1]`` keeps the logits a view: the slice of a (B > 1, T, V) tensor is not contiguous and flattening
    it would copy all of the logits."""
    if ids_key is None:
        t = mb["packed_tokens"] if is_packed(mb) else mb["tokens"]
    else:
        t = to_packed(mb[ids_key], mb) if is_packed(mb) else mb[ids_key]
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def _per_row(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """Values at every logit position (position i predicts i + 1) -> per row, aligned to predicted positions."""
    v = shifted(values[:, :-1])
    return from_packed(v, mb) if is_packed(mb) else v


def target_logprobs(logits, mb: dict, tp_group, temperature: float = 1.0, ids_key: str | None = None):
    """(B, T) log-probs of the micro-batch's tokens (or (B, T, K) at ``mb[ids_key]``), aligned to predicted
    positions; ``logits`` are the padded (B, T, V/tp) or packed (1, S, V/tp) logits of ``mb``."""
    lp = token_logprobs(logits, _next_targets(mb, ids_key), tp_group=tp_group, temperature=temperature,
                        chunk_size=chunk_rows(logits))
    return _per_row(lp, mb)


def target_logprobs_and_entropy(logits, mb: dict, tp_group, temperature: float = 1.0, ids_key: str | None = None):
    """Like :func:`target_logprobs`, plus the masked entropy sum metric from the same pass over the logits (the
    train-step objectives report entropy; a second pass over (B, T, V) logits cost 5-10% of a step on an H100)."""
    lp, ent = token_logprobs(logits, _next_targets(mb, ids_key), tp_group=tp_group, temperature=temperature,
                             chunk_size=chunk_rows(logits), return_entropy=True)
    return _per_row(lp, mb), {"entropy_sum": (_per_row(ent, mb) * mb["loss_mask"]).sum()}


def target_log_tail(logits, mb: dict, tp_group, temperature: float, ids_key: str):
    """(B, T) log of the probability mass outside the ids ``mb[ids_key]`` (B, T, K) at each predicted position,
    exact and differentiable (``logprobs.tail_logprob``)."""
    lt = tail_logprob(logits, _next_targets(mb, ids_key), tp_group=tp_group, chunk_size=chunk_rows(logits),
                      temperature=temperature)
    return _per_row(lt, mb)


@dataclass(frozen=True)
class Normalisers:
    """Global (whole step, all DP ranks) counts the losses divide by."""

    num_tokens: float
    num_seqs: float


def logprob_values(tp_group, temperature: float, topk: int = 0, ids_key: str | None = None, tail: bool = False):
    """Forward-only objective returning per-row log-probs at ``temperature`` (and top-k, or log-probs at given ids
    with, for ``tail``, the log mass outside those ids)."""

    def objective(logits, mb):
        out = {"logprobs": target_logprobs(logits, mb, tp_group, temperature)}
        if topk:
            vals, ids = topk_logprobs(logits, topk, tp_group=tp_group, chunk_size=chunk_rows(logits),
                                      temperature=temperature)
            out["topk_logprobs"], out["topk_ids"] = _per_row(vals, mb), _per_row(ids, mb)
        if ids_key:
            out["logprobs_at_ids"] = target_logprobs(logits, mb, tp_group, temperature, ids_key=ids_key)
            if tail:
                out["log_tail_at_ids"] = target_log_tail(logits, mb, tp_group, temperature, ids_key)
        return logits.sum() * 0.0, out

    return objective


def policy_gradient(tp_group, norm: Normalisers, *, eps_low: float, eps_high: float, temperature: float,
                    loss_agg: str = "token_mean", kl_beta: float = 0.0, kl_clamp: float | None = 10.0,
                    dual_clip_c: float | None = None, correction: RolloutCorrection | None = None):
    """Clipped policy gradient (GRPO, and OPD with per-token advantages), log-probs at the rollout temperature,
    optionally dual-clipped (``dual_clip_c``, None: off) and with a rollout importance-sampling correction
    (``losses.rollout_correction``) from the engine's log-probs."""

    def objective(logits, mb):
        mask = mb["loss_mask"]
        lp, ent = target_logprobs_and_entropy(logits, mb, tp_group, temperature)
        weights, is_metrics = None, {}
        if correction is not None and correction.mode != "none":
            weights, is_metrics = rollout_is_weights(mb["old_logprobs"], mb["engine_logprobs"], mask, correction)
        loss, metrics = losses.clipped_pg_loss(
            lp, mb["old_logprobs"], mb["advantages"], mask, global_num_tokens=norm.num_tokens,
            global_num_seqs=norm.num_seqs, loss_agg=loss_agg, eps_low=eps_low, eps_high=eps_high,
            ref_logprobs=mb.get("ref_logprobs"), kl_beta=kl_beta, kl_clamp=kl_clamp, dual_clip_c=dual_clip_c,
            is_weights=weights)
        metrics.update(ent)
        metrics.update(is_metrics)
        return loss, metrics

    return objective


def forward_kl(tp_group, norm: Normalisers, *, mode: str, temperature: float, tail: bool = True,
               teacher_tail_floor: float = 1e-6):
    """Stage 2a on teacher samples: sampled-token NLL (``mode="sampled"``) or top-k forward KL + tail, the student at
    ``temperature`` against the teacher's top-k recorded at the same temperature (see the module docstring). The
    student's tail is exact (``target_log_tail``); the teacher's comes from its cached top-k."""

    def objective(logits, mb):
        mask = mb["loss_mask"]
        if mode == "sampled":
            lp, ent = target_logprobs_and_entropy(logits, mb, tp_group, temperature)
            loss, metrics = losses.forward_kl_sampled(lp, mask, norm.num_tokens)
        else:
            lp, ent = target_logprobs_and_entropy(logits, mb, tp_group, temperature, ids_key="topk_ids")
            s_tail = target_log_tail(logits, mb, tp_group, temperature, "topk_ids") if tail else None
            loss, metrics = losses.forward_kl_topk(lp, mb["topk_logprobs"], mask, norm.num_tokens, tail,
                                                   tail_floor=teacher_tail_floor, student_log_tail=s_tail)
        metrics.update(ent)
        return loss, metrics

    return objective


def reverse_kl_topk(tp_group, norm: Normalisers, *, temperature: float):
    """Stage 2b top-k variant: KL(p_S || p_T) over the student's top-k ids (fixed at rollout time) plus the tail
    bucket, both tails exact: the student's from its logits here, the teacher's (``teacher_log_tail``) from the
    teacher's logits when it scored the ids (``logprob_values(..., tail=True)``)."""

    def objective(logits, mb):
        mask = mb["loss_mask"]
        lp, ent = target_logprobs_and_entropy(logits, mb, tp_group, temperature, ids_key="topk_ids")
        s_tail = target_log_tail(logits, mb, tp_group, temperature, "topk_ids")
        loss, metrics = losses.reverse_kl_topk(lp, mb["teacher_logprobs_at_ids"], mask, norm.num_tokens, True,
                                               student_log_tail=s_tail, teacher_log_tail=mb["teacher_log_tail"])
        metrics.update(ent)
        return loss, metrics

    return objective


# ----------------------------------------------------------------------------- loss descriptions (what a loop names)
Objective = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class Loss(Protocol):
    """A training loss as a stage names it; the policy binds it (``objective``) to its TP group and normalisers."""

    @property
    def fields(self) -> tuple[str, ...]:
        """The ``RolloutBatch`` fields the loss reads."""

    def objective(self, tp_group, norm: Normalisers) -> Objective: ...


_BASE_FIELDS = ("tokens", "lengths", "loss_mask")


@dataclass(frozen=True)
class PolicyGradientLoss:
    """The clipped policy gradient of GRPO and OPD (``losses.clipped_pg_loss``) at the rollout temperature."""

    temperature: float
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: str = "token_mean"
    kl_beta: float = 0.0
    kl_clamp: float | None = 10.0
    dual_clip_c: float | None = None  # dual-clip bound c > 1 for A < 0 (the plan's ``clip.dual_clip_c``); None: off
    correction: RolloutCorrection | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        corrected = self.correction is not None and self.correction.mode != "none"
        return (_BASE_FIELDS + ("old_logprobs", "advantages") + (("ref_logprobs",) if self.kl_beta else ())
                + (("engine_logprobs",) if corrected else ()))

    def objective(self, tp_group, norm: Normalisers) -> Objective:
        return policy_gradient(tp_group, norm, eps_low=self.eps_low, eps_high=self.eps_high,
                               temperature=self.temperature, loss_agg=self.loss_agg, kl_beta=self.kl_beta,
                               kl_clamp=self.kl_clamp, dual_clip_c=self.dual_clip_c, correction=self.correction)


@dataclass(frozen=True)
class ForwardKLLoss:
    """Stage 2a: forward KL on teacher samples, sampled-token NLL or top-k + tail (``forward_kl``)."""

    mode: str
    temperature: float
    tail: bool = True
    teacher_tail_floor: float = 1e-6

    @property
    def fields(self) -> tuple[str, ...]:
        return _BASE_FIELDS + (("topk_ids", "topk_logprobs") if self.mode == "topk" else ())

    def objective(self, tp_group, norm: Normalisers) -> Objective:
        return forward_kl(tp_group, norm, mode=self.mode, temperature=self.temperature, tail=self.tail,
                          teacher_tail_floor=self.teacher_tail_floor)


@dataclass(frozen=True)
class ReverseKLTopkLoss:
    """Stage 2b top-k variant: reverse KL over the student's top-k ids plus the tail bucket (``reverse_kl_topk``)."""

    temperature: float

    @property
    def fields(self) -> tuple[str, ...]:
        return _BASE_FIELDS + ("topk_ids", "teacher_logprobs_at_ids", "teacher_log_tail")

    def objective(self, tp_group, norm: Normalisers) -> Objective:
        return reverse_kl_topk(tp_group, norm, temperature=self.temperature)
