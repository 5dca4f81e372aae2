"""Stage 2a (fkl_warmup; also the teacher-sample-SFT control): forward KL of the student on *teacher* rollouts.

    once:      the frozen teacher generates ``warmup.teacher_samples_per_prompt`` responses for every prompt the
               stage will use (step by step), with its top-k log-probs at each position; cached on disk per DP rank
    for step:  minimise  sum_t KL(pi_T(.|s_t) || pi_S(.|s_t))  on teacher occupancy
               - mode "topk":    sum_{v in top-k_T} p_T(v)(log p_T(v) - log p_S(v)) + tail bucket
               - mode "sampled": NLL of the teacher's sampled tokens (= teacher-sample SFT)
No labels are used (prompts only). Temperature: the teacher samples at the rollout temperature T and its engine
records its top-k log-probs at T; the student is trained at the same T (the convention of every distillation
objective, see ``policy.objectives``: the optimum is pi_S = pi_T whatever T), so the cache is used as it is.
"""

from __future__ import annotations

import time

from megatron_s2d.policy.objectives import ForwardKLLoss
from megatron_s2d.errors import S2DError
from megatron_s2d.rollout.batch import flatten, to_batch
from megatron_s2d.stages import sample_cache
from megatron_s2d.stages.counters import StepCounters
from megatron_s2d.stages.steps import response_tokens, rollout_metrics


def cache_provenance(job) -> dict:
    """Everything the teacher's samples depend on: the teacher's weights (its checkpoint and the digest of its
    manifest), its dtype/FP8, the sampling (temperature, top-p, top-k, max tokens, engine), the samples per prompt
    and the top-k recorded, the prompts this rank draws (seed, stage, split contents, prompts per step, instruction,
    DP layout). A cache whose header differs is regenerated: reusing one made at another temperature would train
    against top-k log-probs of another distribution."""
    import hashlib

    from megatron_s2d.config.validate import engine_for, split_parts
    from megatron_s2d.data.split_store import read_manifests

    st, wu, r = job.stage, job.stage.warmup, job.stage.rollout
    ckpt = job.store.checkpoint_of(st.teacher, "teacher")
    stamp = ckpt / "manifest.json" if (ckpt / "manifest.json").is_file() else ckpt / "s2d_model.json"
    teacher = job.plan.models["teacher"]
    manifests = read_manifests(job.layout.data)
    return {"teacher_checkpoint": str(ckpt), "teacher_stamp": hashlib.sha256(stamp.read_bytes()).hexdigest()[:16],
            "teacher_dtype": teacher.dtype, "teacher_fp8": teacher.fp8, "engine": engine_for(r),
            "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "max_new_tokens": r.max_new_tokens,
            "teacher_samples_per_prompt": wu.teacher_samples_per_prompt,
            "topk": wu.topk if wu.mode == "topk" else 0, "seed": job.plan.seed, "stage": st.name,
            "split": {part: manifests[part]["content_hash"] for part in split_parts(st.split)},
            "prompts_per_step": st.prompts_per_step, "instruction": job.plan.data.instruction,
            "dp": job.dist.dp, "dp_rank": job.dist.dp_rank}


def _provenance_diff(old: dict | None, new: dict) -> str:
    if old is None:
        return "no provenance recorded"
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def teacher_samples(job, policy) -> list[list]:
    """The teacher's samples for every step of the stage, this DP rank's share: generated step by step (bounded
    messages when the teacher's generation is routed across the job), or loaded from the stage's cache. The student
    ``policy``'s grads and optimizer state stay off the device while the teacher generates (one generation phase
    for all steps: nothing trains in between, so the engine is woken and refit once)."""
    st, wu = job.stage, job.stage.warmup
    path = job.store.dir / "teacher_cache" / f"dp_rank_{job.dist.dp_rank:05d}"
    provenance = cache_provenance(job)

    def accept(samples, made_with):
        if made_with != provenance:
            raise S2DError(f"made with other settings ({_provenance_diff(made_with, provenance)})")
        if len(samples) < st.steps:
            raise S2DError(f"{len(samples)} steps cached, the stage runs {st.steps}")

    cached = sample_cache.load(path, accept, log=lambda m: print(f"[{st.name}] rank {job.dist.rank}: {m}", flush=True),
                               what="teacher cache")
    if cached is not None:
        job.log(f"teacher rollouts: cached {path}")
        return cached[0]
    teacher = job.load_teacher()
    topk = wu.topk if wu.mode == "topk" else 0
    engine = job.make_engine(teacher, trainer=policy, n=wu.teacher_samples_per_prompt, topk=topk, salt=1)
    t0, per_step, tokens, gen_s = time.perf_counter(), [], 0.0, 0.0
    with engine.generation():
        for step in range(st.steps):
            prompts = job.prompts.step(step, st.prompts_per_step)
            result = engine.generate(prompts.prompt_ids,
                                     job.sampling(prompts, wu.teacher_samples_per_prompt, topk=topk, salt=1))
            per_step.append(flatten(result))
            tokens, gen_s = tokens + result.metrics["generated_tokens"], gen_s + result.metrics["time_s"]
    job.log(f"teacher rollouts: {sum(map(len, per_step))} samples, {tokens:.0f} tokens in "
            f"{time.perf_counter() - t0:.1f}s ({tokens / max(gen_s, 1e-9):.0f} tok/s generating)")
    sample_cache.save(path, per_step, provenance)
    engine.close()  # vLLM's pool goes back to the device before the student trains (VLLMEngine.close)
    return per_step


def run(job) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st, wu = job.stage, job.stage.warmup
    policy, state = job.load_policy()
    cache = teacher_samples(job, policy)
    loss = ForwardKLLoss(mode=wu.mode, temperature=st.rollout.temperature, tail=wu.tail,
                         teacher_tail_floor=wu.teacher_tail_floor)
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        samples = cache[step]
        batch = to_batch(samples, job.assets.pad_id)
        train_metrics = policy.train(batch, loss, st.updates_per_step)
        tokens = response_tokens(samples)
        counters = StepCounters(prompts=len(samples) // wu.teacher_samples_per_prompt, sequences=len(samples),
                                generated_tokens=tokens, teacher_scored_tokens=tokens if wu.mode == "topk" else 0.0,
                                trained_sequences=len(samples)).all_reduce(job.dp_group)
        metrics = {**rollout_metrics(samples, {}), **train_metrics, "fkl_mode_topk": float(wu.mode == "topk")}
        if job.end_step(step, policy, state, counters, metrics, t0):
            return True
    job.finish(policy, state)
    return False
