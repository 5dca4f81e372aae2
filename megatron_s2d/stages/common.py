"""Small steps shared by the stage loops: generate, reward, log-probs, train, bookkeeping."""

from __future__ import annotations

import time

import torch

from megatron_s2d.policy import objectives as O
from megatron_s2d.rewards import score_batch_with_stats
from megatron_s2d.rollout.base import SamplingParams, generation_metrics
from megatron_s2d.stages.batch import masked_mean, samples_to_batch, select_rows


def sampling_params(ctx, step: int, n: int, topk: int = 0, salt: int = 0) -> SamplingParams:
    r = ctx.stage.rollout
    return SamplingParams(n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop_token_ids=ctx.stop_ids, logprob_topk=topk,
                          seed=ctx.sampling_seed(step, salt))


def generate(ctx, engine, problem_idx: list[int], params: SamplingParams):
    """Samples for this rank's prompts, flattened prompt-major: [p0 s0..s(n-1), p1 s0, ...]."""
    result = engine.generate([ctx.prompt_ids[i] for i in problem_idx], params)
    flat = [s for group in result.samples for s in group]
    return flat, result.metrics


def rewards(ctx, samples, problem_idx: list[int], n: int) -> tuple[torch.Tensor, dict]:
    """Sparse math-verify reward per sample (1.0 / 0.0)."""
    texts = [ctx.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    golds = [ctx.problems[i].answer for i in problem_idx for _ in range(n)]
    res = score_batch_with_stats(texts, golds)
    return torch.tensor(res.scores), {"reward_timeouts": float(res.stats.n_timeout),
                                      "reward_problems_per_s": res.stats.problems_per_s}


def to_batch(ctx, samples, topk: bool = False) -> dict[str, torch.Tensor]:
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    return samples_to_batch(samples, pad, topk=topk)


def policy_logprobs(ctx, model, batch, temperature: float, ids_key: str | None = None, tail: bool = False) -> dict:
    return model.forward_values(batch, O.logprob_values(model.tp_group, temperature, ids_key=ids_key, tail=tail),
                                ctx.stage.micro_batch_tokens)


def mismatch_metrics(batch: dict, trainer_lp: torch.Tensor) -> dict[str, float]:
    """Engine-vs-trainer log-prob mismatch on the sampled tokens (measured every step)."""
    mask = batch["loss_mask"]
    diff = (batch["engine_logprobs"] - trainer_lp) * mask
    return {"logprob_mismatch_mean": masked_mean(diff.abs(), mask),
            "logprob_mismatch_max": float(diff.abs().max()) if mask.any() else 0.0}


def rollout_metrics(samples) -> dict[str, float]:
    """Response length and truncation of a flat list of samples (the engines' own measure, under stage names)."""
    m = generation_metrics([samples], 0.0)
    return {"response_len_mean": m["mean_response_len"], "truncation_rate": m["truncation_rate"]}


def mini_batches(n: int, updates: int) -> list[range]:
    """Cut ``n`` rows into ``updates`` contiguous pieces whose sizes differ by at most one (a piece is empty only
    when ``n < updates``). ceil(n / updates)-row pieces would leave trailing pieces empty (n=12, u=8: 6 and 7)."""
    base, extra = divmod(n, updates)
    out, start = [], 0
    for k in range(updates):
        size = base + (k < extra)
        out.append(range(start, start + size))
        start += size
    return out


def train_updates(ctx, policy, batch, make_objective) -> dict[str, float]:
    """``updates_per_step`` optimizer updates over contiguous mini-batches of this rank's rows.

    Every rank makes the same number of updates (the gradient all-reduce is a collective): a rank whose piece is
    empty trains on a zero-weight placeholder row (``MegatronPolicy``), and a piece that is empty on *every* rank
    (no loss token anywhere: a global decision) is skipped by all ranks together, advancing only the LR schedule.
    """
    from megatron_s2d.losses import finalize_metrics

    u = ctx.stage.updates_per_step
    out: dict[str, float] = {}
    done = 0
    for rows in mini_batches(batch["tokens"].shape[0], u):
        mb = select_rows(batch, list(rows)) if u > 1 else batch
        mask = mb["loss_mask"]
        tokens, seqs = ctx.all_reduce_sum([float(mask.sum()), float((mask.sum(1) > 0).sum())])
        if tokens == 0:
            policy.skip_update()
            continue
        norm = O.Normalisers(num_tokens=tokens, num_seqs=max(seqs, 1.0))
        res = policy.train_step(mb, make_objective(norm), ctx.stage.micro_batch_tokens)
        extra = {key: res.metrics.pop(key) for key in ("grad_norm", "lr")}
        fin = finalize_metrics(res.metrics)
        fin.update(extra)
        for key, v in fin.items():
            out[key] = out.get(key, 0.0) + v
        done += 1
    out = {k: v / max(done, 1) for k, v in out.items()}
    out["updates"] = float(done)
    if "clip_low_frac" in out:
        out["clip_frac"] = out["clip_low_frac"] + out.get("clip_high_frac", 0.0)
    return out


def refit(ctx, engine, policy) -> None:
    """Push the updated policy weights into the rollout engine (the megatron sampler reads them live)."""
    if ctx.stage.rollout.engine == "vllm":
        from megatron_s2d.rollout.refit import refit_from_policy

        refit_from_policy(engine, policy.module, policy.arch)


def end_step(ctx, policy, state, step: int, metrics: dict, t0: float, preemption=None) -> bool:
    """Ledger, log, periodic checkpoint; returns True if the job must stop now (preemption: checkpoint saved)."""
    state.step = step + 1
    state.ledger.wall_time_s += time.perf_counter() - t0
    metrics["step_time_s"] = time.perf_counter() - t0
    ctx.log_step(step, metrics)
    every = ctx.stage.save_every
    stop = preemption is not None and preemption.should_stop(distributed=True)
    if stop or (every and state.step % every == 0 and state.step < ctx.stage.steps):
        path = ctx.save(policy, state)
        ctx.log(f"checkpoint {path}" + (" (preempted: exiting for requeue)" if stop else ""))
    return stop
