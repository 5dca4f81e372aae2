"""Stage 2b (opd; also the OPD-only control): on-policy distillation on *student* rollouts.

    for step:
        generate   student samples y ~ pi_S for the step's prompts (no labels)
        score      the frozen teacher scores every sampled token: log pi_T(y_t | s_t)           (dense reward)
        advantages a_t = log pi_T(y_t|s_t) - log pi_S(y_t|s_t)      (per-token sampled reverse KL, max-ent RL)
                   [+ opd_task_reward_coef * A_i, A_i the GRPO advantage of the task reward r(x, y_i) within the
                    prompt's samples, if set: then labels are consumed]
        train      the same clipped policy-gradient machinery as GRPO, per-token advantages
                   (opd_mode "topk": reverse KL over the student's top-k ids at each position, with the tail
                   bucket, instead)
        checkpoint / log
Temperature: student and teacher are both compared at the rollout temperature T (``policy.objectives`` explains why:
the optimum is then pi_S = pi_T for every T, the same student the forward-KL warmup aims at).
"""

from __future__ import annotations

import time

from megatron_s2d.losses import opd_token_advantages
from megatron_s2d.policy import objectives as O
from megatron_s2d.stages import common as C
from megatron_s2d.stages.batch import masked_mean


def run(ctx, preemption=None) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st, d = ctx.stage, ctx.stage.distill
    policy, state = ctx.build_policy()
    ctx.truncate_metrics_log(state.step)
    teacher, _ = ctx.build_scorer(st.teacher, "teacher")
    engine = ctx.make_engine(policy)
    n = st.samples_per_prompt
    topk = d.topk if d.opd_mode == "topk" else 0
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        idx = ctx.dp_share(ctx.step_problems(step, st.prompts_per_step))
        samples, gen_m = C.generate(ctx, engine, idx, C.sampling_params(ctx, step, n, topk=topk))
        batch = C.to_batch(ctx, samples, topk=bool(topk))
        temp = st.rollout.temperature
        student_lp = C.policy_logprobs(ctx, policy, batch, temp)["logprobs"]
        ids_key = None
        if topk:
            batch["student_topk_ids"] = batch.pop("topk_ids")
            batch.pop("topk_logprobs")
            ids_key = "student_topk_ids"
        t_out = C.policy_logprobs(ctx, teacher, batch, temp, ids_key=ids_key, tail=bool(topk))
        mask = batch["loss_mask"]
        metrics = {**C.mismatch_metrics(batch, student_lp), **C.rollout_metrics(samples),
                   "generate_tokens_per_s": gen_m["tokens_per_s"],
                   "reverse_kl_mean": masked_mean(student_lp - t_out["logprobs"], mask),
                   "teacher_logprob_mean": masked_mean(t_out["logprobs"], mask)}
        task_reward = None
        if d.opd_task_reward_coef:
            task_reward, rew_m = C.rewards(ctx, samples, idx, n)
            metrics.update(rew_m, reward_mean=float(task_reward.mean()))
        batch["old_logprobs"] = student_lp
        if topk:
            batch["teacher_logprobs_at_ids"] = t_out["logprobs_at_ids"]
            batch["teacher_log_tail"] = t_out["log_tail_at_ids"]
            make = lambda norm: O.reverse_kl_topk(policy.tp_group, norm, temperature=temp)
        else:
            batch["advantages"] = opd_token_advantages(t_out["logprobs"], student_lp, mask, task_reward,
                                                       d.opd_task_reward_coef, group_size=n)
            make = lambda norm: O.policy_gradient(policy.tp_group, norm, eps_low=d.eps_low, eps_high=d.eps_high,
                                                  temperature=temp)
        metrics.update(C.train_updates(ctx, policy, batch, make))
        C.refit(ctx, engine, policy)
        tot = ctx.all_reduce_sum([float(len(idx)), float(sum(len(s.response_ids) for s in samples))])
        state.ledger.prompts += int(tot[0])
        state.ledger.generated_tokens += int(tot[1])
        state.ledger.teacher_scored_tokens += int(tot[1])
        if d.opd_task_reward_coef:
            state.ledger.labels_consumed = min((step + 1) * st.prompts_per_step, len(ctx.problems))
        if C.end_step(ctx, policy, state, step, metrics, t0, preemption):
            return True
    ctx.finish(policy, state)
    return False
