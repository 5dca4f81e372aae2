"""Stage 2a (fkl_warmup; also the teacher-sample-SFT control): forward KL of the student on *teacher* rollouts.

    once:      the frozen teacher generates ``teacher_samples_per_prompt`` responses for every prompt the stage
               will use (step by step), with its top-k log-probs at each position; cached on disk (per DP rank)
    for step:  minimise  sum_t KL(pi_T(.|s_t) || pi_S(.|s_t))  on teacher occupancy
               - fkl_mode "topk":    sum_{v in top-k_T} p_T(v)(log p_T(v) - log p_S(v)) + tail bucket
               - fkl_mode "sampled": NLL of the teacher's sampled tokens (= teacher-sample SFT)
No labels are used (prompts only). Temperature: the teacher samples at the rollout temperature T and its engine
records its top-k log-probs at T; the student is trained at the same T (the convention of every distillation
objective, see ``policy.objectives``: the optimum is pi_S = pi_T whatever T), so the cache is used as it is.
"""

from __future__ import annotations

import os
import time

import torch

from megatron_s2d.policy import objectives as O
from megatron_s2d.stages import common as C
from megatron_s2d.stages.batch import samples_to_batch


def _cache_path(ctx):
    return ctx.dir / "teacher_cache" / f"dp_rank_{ctx._dp_rank():05d}.pt"


def _all_ranks_cached(path) -> bool:
    """True only if every rank of the job has its cache: building the teacher and generating are collectives over
    the whole job (the teacher may have a layout of its own), so all ranks must take the same branch."""
    from megatron_s2d.runtime.dist import comm_device

    t = torch.tensor([1.0 if path.is_file() else 0.0], device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.item() > 0


def _is_dp_writer() -> bool:
    """One rank per data-parallel group writes its cache (the others hold identical samples)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def teacher_rollouts(ctx) -> list:
    """Generate (or load) the teacher samples for every step of this stage, for this DP rank, one step at a time
    (bounded memory and messages when the teacher's generation is routed across the job)."""
    path = _cache_path(ctx)
    if _all_ranks_cached(path):
        ctx.log(f"teacher rollouts: cached {path}")
        return torch.load(path, weights_only=False)
    st, d = ctx.stage, ctx.stage.distill
    teacher, teacher_dir = ctx.build_scorer(st.teacher, "teacher")
    engine = ctx.make_engine(teacher, teacher_dir)
    topk = d.topk if d.fkl_mode == "topk" else 0
    t0 = time.perf_counter()
    samples, tokens, gen_s = [], 0.0, 0.0
    for step in range(st.steps):
        idx = ctx.dp_share(ctx.step_problems(step, st.prompts_per_step))
        params = C.sampling_params(ctx, step, d.teacher_samples_per_prompt, topk=topk, salt=1)
        got, gen_m = C.generate(ctx, engine, idx, params)
        tokens, gen_s = tokens + gen_m["generated_tokens"], gen_s + gen_m["time_s"]
        samples += got
    ctx.log(f"teacher rollouts: {len(samples)} samples, {tokens:.0f} tokens in {time.perf_counter() - t0:.1f}s "
            f"({tokens / max(gen_s, 1e-9):.0f} tok/s generating)")
    if _is_dp_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(samples, tmp)
        os.replace(tmp, path)
    torch.distributed.barrier()
    del teacher, engine
    return samples


def run(ctx, preemption=None) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st, d = ctx.stage, ctx.stage.distill
    ctx.check_tokenizer(ctx.checkpoint_of(st.teacher, "teacher"))
    policy, state = ctx.build_policy()
    ctx.truncate_metrics_log(state.step)
    cache = teacher_rollouts(ctx)
    per_step = len(cache) // st.steps
    topk = d.fkl_mode == "topk"
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        samples = cache[step * per_step:(step + 1) * per_step]
        batch = C.to_batch(ctx, samples, topk=topk)
        if topk:
            batch["teacher_topk_ids"], batch["teacher_topk_logprobs"] = batch.pop("topk_ids"), batch.pop("topk_logprobs")
        make = lambda norm: O.forward_kl(policy.tp_group, norm, mode=d.fkl_mode, tail=d.tail,
                                         temperature=st.rollout.temperature, teacher_tail_floor=d.teacher_tail_floor)
        metrics = {**C.rollout_metrics(samples), "fkl_mode_topk": float(topk)}
        metrics.update(C.train_updates(ctx, policy, batch, make))
        tot = ctx.all_reduce_sum([float(len(samples) // d.teacher_samples_per_prompt),
                                  float(sum(len(s.response_ids) for s in samples))])
        state.ledger.prompts += int(tot[0])
        state.ledger.generated_tokens += int(tot[1])
        state.ledger.teacher_scored_tokens += int(tot[1]) if topk else 0
        if C.end_step(ctx, policy, state, step, metrics, t0, preemption):
            return True
    ctx.finish(policy, state)
    return False
