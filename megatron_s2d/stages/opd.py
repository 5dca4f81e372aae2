"""Stage 2b (opd; also the OPD-only control): on-policy distillation on *student* rollouts.

    for step:
        generate   student samples y ~ pi_S for the step's prompts (no labels)
        score      the frozen teacher scores every sampled token: log pi_T(y_t | s_t)           (dense reward)
        targets    mode "sampled": a_t = log pi_T(y_t|s_t) - log pi_S(y_t|s_t)  (sampled reverse KL, max-ent RL)
                                   [+ task_reward_coef * A_i, A_i the GRPO advantage of the task reward r(x, y_i)
                                    within the prompt's samples, if set: then labels are consumed]
                   mode "topk":    the teacher's log-probs at the student's top-k ids and its mass outside them
                                   (no task reward: a task_reward_coef with mode topk is refused at plan load)
        train      sampled: the same clipped policy gradient as GRPO, per-token advantages;
                   topk: the reverse KL over the student's top-k ids plus the tail bucket
        sync       the rollout engine is marked stale: the next generation refits (its step's metrics carry it)
        checkpoint / log
Temperature: student and teacher are both compared at the rollout temperature T (``policy.objectives`` explains why:
the optimum is then pi_S = pi_T for every T, the same student the forward-KL warmup aims at).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megatron_s2d.losses import opd_token_advantages
from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.policy.interface import Scorer
from megatron_s2d.policy.objectives import PolicyGradientLoss, ReverseKLTopkLoss
from megatron_s2d.rollout.batch import flatten, to_batch
from megatron_s2d.stages.counters import StepCounters
from megatron_s2d.stages.steps import correction, mismatch_metrics, response_tokens, rollout_metrics, sparse_rewards


@dataclass(frozen=True)
class SampledOPD:
    """The teacher's log-prob of each sampled token is the dense reward: per-token advantages, clipped PG."""

    temperature: float
    eps_low: float
    eps_high: float
    task_reward_coef: float
    group_size: int
    correction: object = None  # losses.RolloutCorrection
    topk: int = 0  # the engine records no top-k
    dual_clip_c: float | None = None  # None: off

    def loss(self):
        return PolicyGradientLoss(temperature=self.temperature, eps_low=self.eps_low, eps_high=self.eps_high,
                                  dual_clip_c=self.dual_clip_c, correction=self.correction)

    def targets(self, teacher: Scorer, batch: RolloutBatch, task_reward) -> tuple[RolloutBatch, "object"]:
        teacher_lp = teacher.logprobs(batch, self.temperature)
        adv = opd_token_advantages(teacher_lp, batch.old_logprobs, batch.loss_mask, task_reward,
                                   self.task_reward_coef, group_size=self.group_size)
        return batch.with_(advantages=adv), teacher_lp


@dataclass(frozen=True)
class TopkOPD:
    """Reverse KL over the student's top-k ids (recorded by its engine) plus the tail bucket."""

    temperature: float
    topk: int

    def loss(self):
        return ReverseKLTopkLoss(temperature=self.temperature)

    def targets(self, teacher: Scorer, batch: RolloutBatch, task_reward) -> tuple[RolloutBatch, "object"]:
        scores = teacher.logprobs_at(batch, self.temperature, tail=True)
        return batch.with_(teacher_logprobs_at_ids=scores.at_ids, teacher_log_tail=scores.log_tail), scores.logprobs


def opd_mode(stage):
    """The stage's distillation target, picked once before the loop."""
    o, temp = stage.opd, stage.rollout.temperature
    if o.mode == "topk":
        return TopkOPD(temperature=temp, topk=o.topk)
    return SampledOPD(temperature=temp, eps_low=stage.clip.eps_low, eps_high=stage.clip.eps_high,
                      task_reward_coef=o.task_reward_coef, group_size=stage.samples_per_prompt,
                      correction=correction(stage.rollout_correction, stage.rollout.max_staleness),
                      dual_clip_c=stage.clip.dual_clip_c or None)  # clip.dual_clip_c 0: off


def run(job) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st = job.stage
    graded = st.consumes_labels()  # the loss reads the task reward (sampled OPD with a coef): grade, count labels
    temp, n = st.rollout.temperature, st.samples_per_prompt
    policy, state = job.load_policy()
    teacher = job.load_teacher().scorer(job.dist.dp_rank)
    mode = opd_mode(st)
    engine = job.make_engine(job.policy_model, trainer=policy, n=n, topk=mode.topk, start_step=state.step)
    loss = mode.loss()
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        prompts = job.prompts.step(step, st.prompts_per_step)
        # the engine's memory phases (rollout.colocation): trainer offloaded, engine woken and refit, then asleep
        generated = engine.generate(prompts.prompt_ids, job.sampling(prompts, n, topk=mode.topk))
        samples = flatten(generated)
        batch = to_batch(samples, job.assets.pad_id)
        old = policy.logprobs(batch, temp)
        task_reward, reward_metrics = (sparse_rewards(samples, prompts.answers, n, job.assets.decode,
                                                      grader=job.plan.grader) if graded else (None, {}))
        batch, teacher_lp = mode.targets(teacher, batch.with_(old_logprobs=old), task_reward)
        train_metrics = policy.train(batch, loss, st.updates_per_step)
        engine.sync_weights(policy)  # lazy: the next generate refits (its metrics come back in generated.sync)
        tokens = response_tokens(samples)
        counters = StepCounters(prompts=len(prompts.indices), sequences=len(samples), generated_tokens=tokens,
                                teacher_scored_tokens=tokens, trained_sequences=len(samples),
                                reward_sum=float(task_reward.sum()) if graded else 0.0).all_reduce(job.dp_group)
        if graded:
            state.ledger.labels_consumed = job.prompts.distinct_until(step, st.prompts_per_step)
            reward_metrics["reward_mean"] = counters.reward_sum / counters.sequences
        metrics = {**rollout_metrics(samples, generated.metrics), **mismatch_metrics(batch, old), **reward_metrics,
                   **train_metrics, **generated.sync, "reverse_kl_mean": batch.masked_mean(old - teacher_lp),
                   "teacher_logprob_mean": batch.masked_mean(teacher_lp)}
        if job.end_step(step, policy, state, counters, metrics, t0):
            return True
    engine.close()  # the final checkpoint and evaluation run without vLLM's memory (its residue survives sleep)
    job.finish(policy, state)
    return False
