"""Objectives: glue between vocab-parallel logits and the pure losses in ``megatron_s2d.losses``.

An objective is ``(logits_shard (B, T, V/tp), micro_batch) -> (loss, metrics)``; the policy runs it inside megatron's
pipeline schedule on the last stage. Token alignment: ``logits[:, t-1]`` predicts ``tokens[:, t]``; all per-token
fields of a micro-batch (``loss_mask``, ``old_logprobs``, ``advantages``, ``teacher_*``...) are indexed by the
position of the *predicted* token, with position 0 unused.

Micro-batch keys: ``tokens`` (B,T) long, ``lengths`` (B,), ``loss_mask`` (B,T) float, plus per objective:
  pg (GRPO / OPD):     ``old_logprobs`` (B,T), ``advantages`` (B,T), optional ``ref_logprobs`` (B,T)
  fkl_topk:            ``teacher_topk_ids`` (B,T,K) long, ``teacher_topk_logprobs`` (B,T,K)
  rkl_topk (OPD top-k): ``student_topk_ids`` (B,T,K), ``teacher_logprobs_at_ids`` (B,T,K)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_s2d import losses
from megatron_s2d.policy.logprobs import entropy, token_logprobs, topk_logprobs


def shifted(values: torch.Tensor) -> torch.Tensor:
    """Put per-position values computed from logits[:, :-1] at the predicted-token positions 1..T-1 (pad 0)."""
    pad = torch.zeros_like(values[:, :1])
    return torch.cat([pad, values], dim=1)


def target_logprobs(logits, tokens, tp_group, temperature: float = 1.0, ids: torch.Tensor | None = None):
    """(B, T) log-probs of ``tokens`` (or (B, T, K) at ``ids``), aligned to predicted positions."""
    targets = tokens[:, 1:] if ids is None else ids[:, 1:]
    lp = token_logprobs(logits[:, :-1], targets, tp_group=tp_group, temperature=temperature)
    return shifted(lp)


@dataclass(frozen=True)
class Normalisers:
    """Global (whole step, all DP ranks) counts the losses divide by."""

    num_tokens: float
    num_seqs: float


def _entropy_metrics(logits, mask, tp_group, temperature):
    with torch.no_grad():
        ent = shifted(entropy(logits[:, :-1].detach(), tp_group=tp_group, temperature=temperature))
        return {"entropy_sum": (ent * mask).sum()}


def logprob_values(tp_group, temperature: float = 1.0, topk: int = 0, ids_key: str | None = None):
    """Forward-only objective returning per-row log-probs (and top-k, or log-probs at given ids)."""

    def objective(logits, mb):
        out = {"logprobs": target_logprobs(logits, mb["tokens"], tp_group, temperature)}
        if topk:
            vals, ids = topk_logprobs(logits[:, :-1], topk, tp_group=tp_group)
            out["topk_logprobs"], out["topk_ids"] = shifted(vals), shifted(ids)
        if ids_key:
            out["logprobs_at_ids"] = target_logprobs(logits, mb["tokens"], tp_group, temperature, ids=mb[ids_key])
        return logits.sum() * 0.0, out

    return objective


def policy_gradient(tp_group, norm: Normalisers, *, eps_low: float, eps_high: float, loss_agg: str = "token_mean",
                    kl_beta: float = 0.0, temperature: float = 1.0):
    """Clipped policy gradient (GRPO, and OPD with per-token advantages)."""

    def objective(logits, mb):
        mask = mb["loss_mask"]
        lp = target_logprobs(logits, mb["tokens"], tp_group, temperature)
        loss, metrics = losses.clipped_pg_loss(
            lp, mb["old_logprobs"], mb["advantages"], mask, global_num_tokens=norm.num_tokens,
            global_num_seqs=norm.num_seqs, loss_agg=loss_agg, eps_low=eps_low, eps_high=eps_high,
            ref_logprobs=mb.get("ref_logprobs"), kl_beta=kl_beta)
        metrics.update(_entropy_metrics(logits, mask, tp_group, temperature))
        return loss, metrics

    return objective


def forward_kl(tp_group, norm: Normalisers, *, mode: str, tail: bool = True):
    """Stage 2a on teacher samples: sampled-token NLL (``mode="sampled"``) or top-k forward KL + tail."""

    def objective(logits, mb):
        mask = mb["loss_mask"]
        if mode == "sampled":
            lp = target_logprobs(logits, mb["tokens"], tp_group)
            loss, metrics = losses.forward_kl_sampled(lp, mask, norm.num_tokens)
        else:
            lp = target_logprobs(logits, mb["tokens"], tp_group, ids=mb["teacher_topk_ids"])
            loss, metrics = losses.forward_kl_topk(lp, mb["teacher_topk_logprobs"], mask, norm.num_tokens, tail)
        metrics.update(_entropy_metrics(logits, mask, tp_group, 1.0))
        return loss, metrics

    return objective


def reverse_kl_topk(tp_group, norm: Normalisers, *, tail: bool = True):
    """Stage 2b top-k variant: KL(p_S || p_T) over the student's top-k ids (fixed at rollout time)."""

    def objective(logits, mb):
        mask = mb["loss_mask"]
        lp = target_logprobs(logits, mb["tokens"], tp_group, ids=mb["student_topk_ids"])
        loss, metrics = losses.reverse_kl_topk(lp, mb["teacher_logprobs_at_ids"], mask, norm.num_tokens, tail)
        metrics.update(_entropy_metrics(logits, mask, tp_group, 1.0))
        return loss, metrics

    return objective
