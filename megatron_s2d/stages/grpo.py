"""Stage 1 (teacher_rl) and Stage 3 (student_rl): GRPO with the sparse math-verify reward.

    for step:
        generate   G samples for each of the step's prompts (this rank's share)
        score      r in {0, 1} by math-verify against the gold answer              (labels consumed)
        advantages A_i = (r_i - mean_G r) / (std_G r + eps)   [Dr. GRPO: no std]   zero-variance groups counted
        train      clipped surrogate with clip-higher, optional k3 KL to the reference, token- or seq-mean
        sync       the rollout engine is marked stale: the next generation refits (nothing to do for the megatron
                   sampler); that step's metrics carry the refit
        checkpoint / log
Deviation: with ``grpo.dynamic_sampling`` the zero-variance groups are dropped from the batch instead of re-sampling
more prompts until the batch is full (DAPO's variant): the step trains on fewer sequences (``trained_seqs``); a rank
left with none still takes part in the update (``Policy.train``).
"""

from __future__ import annotations

import time

from megatron_s2d.losses import grpo_advantages
from megatron_s2d.policy.objectives import PolicyGradientLoss
from megatron_s2d.rollout.batch import flatten, to_batch
from megatron_s2d.stages.counters import StepCounters
from megatron_s2d.stages.steps import correction, mismatch_metrics, response_tokens, rollout_metrics, sparse_rewards


def grpo_loss(st) -> PolicyGradientLoss:
    """The stage's clipped policy gradient: its clip (and dual clip), GRPO's KL and aggregation, rollout correction."""
    g = st.grpo
    return PolicyGradientLoss(temperature=st.rollout.temperature, eps_low=st.clip.eps_low, eps_high=st.clip.eps_high,
                              loss_agg=g.loss_agg, kl_beta=g.kl_beta, kl_clamp=g.kl_clamp,
                              dual_clip_c=st.clip.dual_clip_c or None,  # clip.dual_clip_c 0: off
                              correction=correction(st.rollout_correction, st.rollout.max_staleness))


def run(job) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st, g = job.stage, job.stage.grpo
    temp, n = st.rollout.temperature, st.samples_per_prompt
    policy, state = job.load_policy()
    reference = job.load_reference() if g.kl_beta > 0 else None
    engine = job.make_engine(job.policy_model, trainer=policy, n=n, start_step=state.step)
    loss = grpo_loss(st)
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        prompts = job.prompts.step(step, st.prompts_per_step)
        # the engine's memory phases (rollout.colocation): trainer offloaded, engine woken and refit, then asleep
        generated = engine.generate(prompts.prompt_ids, job.sampling(prompts, n))
        samples = flatten(generated)
        rewards, reward_metrics = sparse_rewards(samples, prompts.answers, n, job.assets.decode,
                                                 grader=job.plan.grader)
        adv = grpo_advantages(rewards, n, scale_by_std=g.scale_by_std)
        batch = to_batch(samples, job.assets.pad_id)
        if g.overlong_filter:
            keep = [float(s.finish_reason != "length") for s in samples]
            batch = batch.with_(loss_mask=batch.loss_mask * batch.loss_mask.new_tensor(keep)[:, None])
        old = policy.logprobs(batch, temp)
        batch = batch.with_(old_logprobs=old, advantages=adv.advantages,
                            ref_logprobs=reference.logprobs(batch, temp) if reference else None)
        rows = [i for i in range(len(samples)) if not (g.dynamic_sampling and adv.zero_variance_groups[i // n])]
        train_metrics = policy.train(batch.rows(rows), loss, st.updates_per_step)
        engine.sync_weights(policy)  # lazy: the next generate refits (its metrics come back in generated.sync)
        counters = StepCounters(prompts=len(prompts.indices), sequences=len(samples),
                                generated_tokens=response_tokens(samples), reward_sum=float(rewards.sum()),
                                zero_variance_groups=adv.num_zero_variance, trained_sequences=len(rows),
                                ).all_reduce(job.dp_group)
        state.ledger.labels_consumed = job.prompts.distinct_until(step, st.prompts_per_step)
        metrics = {**rollout_metrics(samples, generated.metrics), **mismatch_metrics(batch, old), **reward_metrics,
                   **train_metrics, **generated.sync, "reward_mean": counters.reward_sum / counters.sequences,
                   "zero_variance_frac": counters.zero_variance_groups / counters.prompts,
                   "trained_seqs": counters.trained_sequences}
        if job.end_step(step, policy, state, counters, metrics, t0):
            return True
    engine.close()  # the final checkpoint and evaluation run without vLLM's memory (its residue survives sleep)
    job.finish(policy, state)
    return False
