"""Stage 1 (teacher_rl) and Stage 3 (student_rl): GRPO with the sparse math-verify reward.

    for step:
        generate   G samples for each of the step's prompts (this rank's share)
        score      r in {0, 1} by math-verify against the gold answer              (labels consumed)
        advantages A_i = (r_i - mean_G r) / (std_G r + eps)   [Dr. GRPO: no std]   zero-variance groups counted
        train      clipped surrogate with clip-higher, optional k3 KL to the reference, token- or seq-mean
        refit      push the new weights to the rollout engine (no-op for the megatron sampler)
        checkpoint / log
Deviation: with ``dynamic_sampling`` the zero-variance groups are dropped from the batch instead of re-sampling
more prompts until the batch is full (DAPO's variant): the step trains on fewer sequences; the count is logged.
"""

from __future__ import annotations

import time

import torch

from megatron_s2d.losses import grpo_advantages
from megatron_s2d.policy import objectives as O
from megatron_s2d.stages import common as C
from megatron_s2d.stages.batch import select_rows


def run(ctx, preemption=None) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st, g = ctx.stage, ctx.stage.grpo
    policy, state = ctx.build_policy()
    ctx.truncate_metrics_log(state.step)
    ref = ctx.build_scorer(st.init, ctx.role)[0] if g.kl_beta > 0 else None
    engine = ctx.make_engine(policy)
    n = st.samples_per_prompt
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        idx = ctx.dp_share(ctx.step_problems(step, st.prompts_per_step))
        samples, gen_m = C.generate(ctx, engine, idx, C.sampling_params(ctx, step, n))
        reward, rew_m = C.rewards(ctx, samples, idx, n)
        adv = grpo_advantages(reward, n, scale_by_std=g.scale_by_std)
        batch = C.to_batch(ctx, samples)
        batch["advantages"] = adv.advantages
        if g.overlong_filter:
            keep = torch.tensor([s.finish_reason != "length" for s in samples], dtype=torch.float32)
            batch["loss_mask"] = batch["loss_mask"] * keep[:, None]
        rows = list(range(len(samples)))
        if g.dynamic_sampling:
            rows = [i for i in rows if not bool(adv.zero_variance_groups[i // n])]
        lp = C.policy_logprobs(ctx, policy, batch, st.rollout.temperature)["logprobs"]
        metrics = {**C.mismatch_metrics(batch, lp), **C.rollout_metrics(samples), **rew_m,
                   "generate_tokens_per_s": gen_m["tokens_per_s"]}
        batch["old_logprobs"] = lp
        if ref is not None:
            batch["ref_logprobs"] = C.policy_logprobs(ctx, ref, batch, st.rollout.temperature)["logprobs"]
        tot = ctx.all_reduce_sum([float(reward.sum()), float(len(reward)), float(adv.num_zero_variance),
                                  float(len(idx)), float(len(rows)),
                                  float(sum(len(s.response_ids) for s in samples))])
        metrics.update(reward_mean=tot[0] / tot[1], zero_variance_frac=tot[2] / tot[3], trained_seqs=tot[4])
        if tot[4] == 0:
            ctx.log(f"step {step + 1}: every group has zero reward variance; no update (no signal)")
        # this rank's share may be empty (dynamic sampling drops groups per rank): train_updates still takes part
        batch = select_rows(batch, rows) if len(rows) < len(samples) else batch
        make = lambda norm: O.policy_gradient(
            policy.tp_group, norm, eps_low=g.eps_low, eps_high=g.eps_high, loss_agg=g.loss_agg,
            kl_beta=g.kl_beta, kl_clamp=g.kl_clamp, temperature=st.rollout.temperature)
        metrics.update(C.train_updates(ctx, policy, batch, make))
        C.refit(ctx, engine, policy)
        led = state.ledger
        led.prompts += int(tot[3])
        led.generated_tokens += int(tot[5])
        led.labels_consumed = min((step + 1) * st.prompts_per_step, len(ctx.problems))
        if C.end_step(ctx, policy, state, step, metrics, t0, preemption):
            return True
    ctx.finish(policy, state)
    return False
