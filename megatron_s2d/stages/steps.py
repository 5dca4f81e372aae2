"""Small named steps the stage loops share: the sparse reward, rollout metrics, engine-vs-trainer mismatch."""

from __future__ import annotations

import torch

from megatron_s2d.losses import RolloutCorrection

from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.rewards import score_batch_with_stats
from megatron_s2d.rollout.base import Sample, generation_metrics


def sparse_rewards(samples: list[Sample], answers: list[str], n: int, decode) -> tuple[torch.Tensor, dict]:
    """r in {0, 1} per sample by math-verify against its prompt's gold answer (samples prompt-major, ``n`` each):
    this is where labels are consumed."""
    texts = [decode(s.response_ids) for s in samples]
    golds = [a for a in answers for _ in range(n)]
    res = score_batch_with_stats(texts, golds)
    return torch.tensor(res.scores), {"reward_timeouts": float(res.stats.n_timeout),
                                      "reward_problems_per_s": res.stats.problems_per_s}


def rollout_metrics(samples: list[Sample], engine_metrics: dict) -> dict[str, float]:
    """Response length, truncation and generation throughput of a step's samples (this rank)."""
    m = generation_metrics([samples], 0.0)
    out = {"response_len_mean": m["mean_response_len"], "truncation_rate": m["truncation_rate"]}
    if "tokens_per_s" in engine_metrics:
        out["generate_tokens_per_s"] = engine_metrics["tokens_per_s"]
    return out


def mismatch_metrics(batch: RolloutBatch, trainer_logprobs: torch.Tensor) -> dict[str, float]:
    """Engine-vs-trainer log-prob mismatch on the sampled tokens (the engine's numbers vs the trainer's, same T)."""
    mask = batch.loss_mask
    diff = (batch.engine_logprobs - trainer_logprobs) * mask
    return {"logprob_mismatch_mean": batch.masked_mean(diff.abs()),
            "logprob_mismatch_max": float(diff.abs().max()) if mask.any() else 0.0}


def response_tokens(samples: list[Sample]) -> float:
    return float(sum(len(s.response_ids) for s in samples))


def correction(cfg) -> RolloutCorrection | None:
    """The loss's rollout IS correction from the stage's ``rollout_correction`` config (None when off)."""
    if cfg.mode == "none":
        return None
    return RolloutCorrection(mode=cfg.mode, tis_cap=cfg.tis_cap, low=cfg.low, high=cfg.high)
