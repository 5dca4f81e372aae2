"""Small named steps the stage loops share: the sparse reward, rollout metrics, engine-vs-trainer mismatch."""

from __future__ import annotations

import torch

from megatron_s2d.errors import InternalError
from megatron_s2d.losses import RolloutCorrection

from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.rewards import score_batch_with_stats
from megatron_s2d.rollout.base import Sample, generation_metrics


def sparse_rewards(samples: list[Sample], answers: list[str], n: int, decode, *,
                   grader: str) -> tuple[torch.Tensor, dict]:
    """r in {0, 1} per sample by the plan's ``grader`` (math-verify or the Hendrycks last box) against its prompt's
    gold answer (samples prompt-major, ``n`` each): this is where labels are consumed."""
    texts = [decode(s.response_ids) for s in samples]
    golds = [a for a in answers for _ in range(n)]
    res = score_batch_with_stats(texts, golds, grader=grader)
    return torch.tensor(res.scores), {"reward_timeouts": float(res.stats.n_timeout),
                                      "reward_problems_per_s": res.stats.problems_per_s}


def rollout_metrics(samples: list[Sample], engine_metrics: dict) -> dict[str, float]:
    """Response length, truncation and generation throughput of a step's samples (this rank)."""
    m = generation_metrics([samples], 0.0)
    out = {"response_len_mean": m["mean_response_len"], "truncation_rate": m["truncation_rate"]}
    if "tokens_per_s" in engine_metrics:
        out["generate_tokens_per_s"] = engine_metrics["tokens_per_s"]
    return out


def logprob_mismatch(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """Rollout-engine vs trainer log-probs of the same sampled tokens at the same temperature (``rollout.base``
    convention): the numbers that show the engine drifting off-policy. With d = trainer - engine
    (= log pi_train / pi_engine) and r = exp(d) over the masked tokens:

    - ``mean_abs_diff``, ``max_abs_diff``, ``mean_diff``: |d| averaged / maximal, and d signed;
    - ``ratio_mean_minus_1``: mean(r) - 1. Samples come from the engine, so E[r] = 1 exactly when both are proper
      distributions over the same support: a non-zero value is the bias an importance weight would correct;
    - ``k3_kl``: mean(r - 1 - d), Schulman's k3 estimator of KL(pi_engine || pi_trainer) (unbiased, every term >= 0);
    - ``n_tokens``: how many tokens were compared (all values are 0 when the mask selects none: an empty share).
    Float64, so exp(d) cannot overflow for any realistic gap; values under the mask never enter (padding may be NaN).

    Args:
        engine_logprobs: (B, T) log-probs recorded by the rollout engine.
        trainer_logprobs: (B, T) log-probs from the trainer's forward (may require grad; it is detached).
        mask: (B, T) bool or float, nonzero on the response tokens to compare.
    """
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != mask.shape:
        raise InternalError(f"logprob_mismatch: shapes differ: engine_logprobs {tuple(engine_logprobs.shape)}, "
                            f"trainer_logprobs {tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    keep = mask.detach() != 0  # (B, T)
    e = engine_logprobs.detach().to(torch.float64)[keep]  # (N,)
    t = trainer_logprobs.detach().to(torch.float64)[keep]  # (N,)
    if e.numel() == 0:
        return dict.fromkeys(("mean_abs_diff", "max_abs_diff", "mean_diff", "ratio_mean_minus_1", "k3_kl",
                              "n_tokens"), 0.0)
    d = t - e  # (N,) log pi_train - log pi_engine
    r = torch.exp(d)  # (N,)
    return {"mean_abs_diff": d.abs().mean().item(), "max_abs_diff": d.abs().max().item(),
            "mean_diff": d.mean().item(), "ratio_mean_minus_1": (r.mean() - 1.0).item(),
            "k3_kl": (r - 1.0 - d).mean().item(), "n_tokens": float(e.numel())}


def mismatch_metrics(batch: RolloutBatch, trainer_logprobs: torch.Tensor) -> dict[str, float]:
    """The step's logged mismatch (this rank's rows): :func:`logprob_mismatch` on the batch's loss tokens."""
    m = logprob_mismatch(batch.engine_logprobs, trainer_logprobs, batch.loss_mask)
    return {"logprob_mismatch_mean": m["mean_abs_diff"], "logprob_mismatch_max": m["max_abs_diff"],
            "logprob_mismatch_k3_kl": m["k3_kl"]}


def response_tokens(samples: list[Sample]) -> float:
    return float(sum(len(s.response_ids) for s in samples))


def correction(cfg, max_staleness: int = 0) -> RolloutCorrection | None:
    """The loss's rollout IS correction from a stage's ``rollout_correction`` config (None when off; ``auto``: tis
    when its generation runs ahead, ``max_staleness`` = ``rollout.max_staleness`` > 0), with the band of its mode:
    ``low`` / ``high`` (a sequence's geometric-mean ratio) for mis and seq_mask_tis, ``icepop_low`` /
    ``icepop_high`` (each token's ratio) for icepop."""
    mode = cfg.resolved(max_staleness)
    if mode == "none":
        return None
    low, high = (cfg.icepop_low, cfg.icepop_high) if mode == "icepop" else (cfg.low, cfg.high)
    return RolloutCorrection(mode=mode, tis_cap=cfg.tis_cap, low=low, high=high)
