"""The SFT-trained teacher (teacher_sft; the paper's SFT-trained teachers of Tables 3 and 5): supervised fine-tuning
of the teacher on its labeled split, the NLL of response tokens (``losses.sft_loss``, through ``ForwardKLLoss(mode=
"sampled")``: the same loss as the teacher-sample-SFT warmup, here on the teacher's own labeled data).

    sft.source: solutions                                   SFT on the reference solutions
        for step:
            prompts    the step's prompts_per_step prompts (``job.prompts``, as in every stage)
            responses  each prompt's reference solution, ending in \\boxed{answer} and the stop token  (labels consumed)
            train      NLL of the response tokens
            checkpoint / log
    sft.source: rejection                                   rejection-sampling fine-tuning (RFT; rounds > 1: expert
        for round in range(sft.rounds):                     iteration, ReST-EM)
            sample     sft.samples_per_prompt responses for every prompt of the split, by the current teacher
            grade      r in {0, 1} by the plan's grader against the gold answer                   (labels consumed)
            keep       the samples graded correct (cached in the stage folder with their provenance)
            for step in the round's steps / rounds steps:
                batch  prompts_per_step kept prompts' kept samples, cycling through the round's kept prompts
                train  NLL of the kept responses
                checkpoint / log

Deviations and choices: the NLL is of softmax(z / T) at ``rollout.temperature`` (the convention of every objective,
``policy.objectives``; T = 1 by default, plain SFT). Rejection rounds continue from the current weights (ReST-EM
restarts each iteration from the base model), and keep every correct sample, duplicates included (RFT, Yuan et al.
2023, de-duplicates by reasoning path). The kept set is per data-parallel rank (each rank cycles through the prompts
it sampled): a resume at another data-parallel layout regenerates the round (the cache records the layout) and, past
a round's first step, is refused, since the weights that round sampled with are gone. A reference solution longer
than ``rollout.max_new_tokens`` is refused naming the row (never truncated); a solution without a ``\\boxed{}`` gets
" The answer is \\boxed{answer}." appended (the toy's worked solutions and MATH's already end in one).
"""

from __future__ import annotations

import time

from megatron_s2d.errors import S2DError
from megatron_s2d.policy.objectives import ForwardKLLoss
from megatron_s2d.rewards.extract import last_boxed
from megatron_s2d.rollout.base import Sample
from megatron_s2d.rollout.batch import flatten, to_batch
from megatron_s2d.stages import sample_cache
from megatron_s2d.stages.counters import StepCounters
from megatron_s2d.stages.prompts import StepPrompts
from megatron_s2d.stages.steps import response_tokens, rollout_metrics, sparse_rewards


# ------------------------------------------------------------------------------------------------ sft.source: solutions
def solution_responses(job) -> list[list[int]]:
    """Every split problem's reference solution as response token ids (ending in the stop token); refuses a split
    row without one, or one longer than ``rollout.max_new_tokens``, naming the row and the pool."""
    st, tok = job.stage, job.assets.tokenizer
    stop = tok.eos_token_id if tok.eos_token_id in job.assets.stop_ids else job.assets.stop_ids[0]
    problems = job.prompts.problems
    missing = [p for p in problems if p.solution is None]
    if missing:
        raise S2DError(f"stages.{st.name}: data.pool = {job.plan.data.pool!r}: {len(missing)} of the "
                       f"{len(problems)} problems of split {st.split!r} carry no reference solution (first: "
                       f"{missing[0].id!r}); sft.source: solutions trains on them: set sft.source: rejection, or use a "
                       "pool with a 'solution' per row")
    out = []
    for p in problems:
        text = p.solution if last_boxed(p.solution)[0] else f"{p.solution} The answer is \\boxed{{{p.answer}}}."
        ids = tok(text, add_special_tokens=False)["input_ids"] + [stop]
        if len(ids) > st.rollout.max_new_tokens:
            raise S2DError(f"stages.{st.name}: the reference solution of problem {p.id!r} is {len(ids)} tokens, "
                           f"longer than rollout.max_new_tokens = {st.rollout.max_new_tokens}: raise it (each "
                           "model's context must hold it plus data.max_prompt_tokens)")
        out.append(ids)
    return out


def solution_samples(prompts: StepPrompts, responses: list[list[int]]) -> list[Sample]:
    return [Sample(prompt_ids=p, response_ids=responses[i], logprobs=[0.0] * len(responses[i]), finish_reason="stop")
            for i, p in zip(prompts.indices, prompts.prompt_ids)]


# ------------------------------------------------------------------------------------------------ sft.source: rejection
def round_chunks(job, rnd: int) -> list[tuple[StepPrompts, int]]:
    """The prompts of round ``rnd``: every problem of the split once, in the round's seeded order (the prompt
    stream's epoch ``rnd``), cut into chunks of ``prompts_per_step`` prompts (this rank's contiguous share of each,
    as a step's); the last chunk is filled from the start of the order so every rank generates alike, and those
    repeats are dropped (the int: how many of the chunk's prompts are new)."""
    st, stream, dist = job.stage, job.prompts, job.dist
    n, count = len(stream.problems), st.prompts_per_step
    order = stream.global_indices(rnd, n)  # epoch rnd: a permutation of the split
    per = count // dist.dp
    out = []
    for c in range(-(-n // count)):
        pos = list(range(c * count + dist.dp_rank * per, c * count + (dist.dp_rank + 1) * per))
        idx = [order[q % n] for q in pos]
        out.append((StepPrompts(c, idx, [stream.prompt_ids[i] for i in idx], [stream.problems[i].answer for i in idx],
                                f"{stream.seed}:{st.name}:round{rnd}:{c}:{dist.dp_rank}"), sum(q < n for q in pos)))
    return out


def cache_provenance(job, rnd: int) -> dict:
    """What round ``rnd``'s kept samples depend on besides the stage's own earlier steps (which the resume check
    pins): the starting checkpoint, the sampling, the grading inputs and this rank's place."""
    import hashlib

    from megatron_s2d.config.validate import engine_for, split_parts
    from megatron_s2d.data.split_store import read_manifests

    st, r = job.stage, job.stage.rollout
    stamp = job.init_dir / "manifest.json" if (job.init_dir / "manifest.json").is_file() else \
        job.init_dir / "s2d_model.json"
    manifests = read_manifests(job.layout.data)
    return {"round": rnd, "init_checkpoint": str(job.init_dir),
            "init_stamp": hashlib.sha256(stamp.read_bytes()).hexdigest()[:16], "engine": engine_for(r),
            "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "max_new_tokens": r.max_new_tokens,
            "samples_per_prompt": st.sft.samples_per_prompt, "rounds": st.sft.rounds, "grader": job.plan.grader,
            "seed": job.plan.seed,
            "stage": st.name, "split": {part: manifests[part]["content_hash"] for part in split_parts(st.split)},
            "prompts_per_step": st.prompts_per_step, "instruction": job.plan.data.instruction,
            "dp": job.dist.dp, "dp_rank": job.dist.dp_rank}


def sample_and_keep(job, engine, rnd: int) -> tuple[list[list[Sample]], dict]:
    """Round ``rnd``: the current teacher samples every prompt of the split, the reward grades each sample, the
    correct ones are kept, per prompt (prompts with none left out). Returns (kept groups, this rank's counts)."""
    n = job.stage.sft.samples_per_prompt
    kept, stats = [], {"sampled": 0, "generated_tokens": 0.0, "kept": 0}
    with engine.generation():  # one phase for the round: the engine is woken and refit once
        for prompts, new in round_chunks(job, rnd):
            samples = flatten(engine.generate(prompts.prompt_ids, job.sampling(prompts, n)))[:new * n]
            rewards, _ = sparse_rewards(samples, prompts.answers[:new], n, job.assets.decode, grader=job.plan.grader)
            for p in range(new):
                group = [s for s, r in zip(samples[p * n:(p + 1) * n], rewards[p * n:(p + 1) * n]) if r > 0]
                kept += [group] if group else []
            stats["sampled"] += len(samples)
            stats["generated_tokens"] += response_tokens(samples)
            stats["kept"] += int((rewards > 0).sum())
    return kept, stats


def kept_round(job, engine, rnd: int, first_step: bool) -> tuple[list[list[Sample]], dict]:
    """Round ``rnd``'s kept samples and its counts (``kept_frac``: over all ranks): from the stage's cache when it
    holds them with this provenance, else sampled now. Sampling is only possible at the round's first step
    (``first_step``): later, the weights it sampled with are gone, and a resume there without the cache is refused.
    A round that kept nothing on any rank is refused (there is nothing to train on)."""
    kept, stats = _kept_round(job, engine, rnd, first_step)
    total = StepCounters(sequences=stats["sampled"], trained_sequences=stats["kept"]).all_reduce(job.dp_group)
    if total.trained_sequences == 0:
        raise S2DError(f"stages.{job.stage.name}: rejection round {rnd} kept none of its {total.sequences:.0f} "
                       "samples (the reward graded all of them wrong): raise sft.samples_per_prompt or "
                       "rollout.max_new_tokens, or start from a stronger teacher")
    return kept, dict(stats, kept_frac=total.trained_sequences / total.sequences)


def _kept_round(job, engine, rnd: int, first_step: bool) -> tuple[list[list[Sample]], dict]:
    path = job.store.dir / "sft_samples" / f"round_{rnd:04d}" / f"dp_rank_{job.dist.dp_rank:05d}"
    provenance = cache_provenance(job, rnd)

    def accept(samples, header):
        if (header or {}).get("made_with") != provenance or "stats" not in header:
            raise S2DError("made with other settings")

    cached = sample_cache.load(path, accept, log=job.log, what=f"round {rnd} cache")
    if cached is not None:
        job.log(f"round {rnd}: kept samples cached {path}")
        return cached[0], cached[1]["stats"]
    if not first_step:
        raise S2DError(f"stages.{job.stage.name}: resuming inside rejection round {rnd} without its kept samples "
                       f"({path} is missing or was made with other settings): the weights that round sampled with "
                       "are gone; redo the stage with `s2d run PLAN --restart STAGE`")
    t0 = time.perf_counter()
    kept, stats = sample_and_keep(job, engine, rnd)
    job.log(f"round {rnd}: kept {stats['kept']} of {stats['sampled']} samples ({len(kept)} prompts) in "
            f"{time.perf_counter() - t0:.1f}s")
    sample_cache.save(path, kept, {"made_with": provenance, "stats": stats})
    return kept, stats


def kept_batch(kept: list[list[Sample]], j: int, per: int) -> list[Sample]:
    """Step ``j`` of a round: ``per`` kept prompts' samples, cycling through the round's kept prompts in order (all
    of them, each once, when the round kept no more than ``per``)."""
    return [s for i in range(j * per, j * per + min(per, len(kept))) for s in kept[i % len(kept)]]


# ------------------------------------------------------------------------------------------------ the loop
def run(job) -> bool:
    """Returns True when preempted (a checkpoint was saved; the job should exit for requeue)."""
    st, sft = job.stage, job.stage.sft
    policy, state = job.load_policy()
    loss = ForwardKLLoss(mode="sampled", temperature=st.rollout.temperature)  # the response tokens' NLL
    rejection = sft.source == "rejection"
    # rounds, not one request per step: an engine on generation ranks of their own asks nothing ahead
    engine = job.make_engine(job.policy_model, trainer=policy, start_step=state.step, per_step=False) \
        if rejection else None
    responses = None if rejection else solution_responses(job)
    per_round, per_rank = st.steps // sft.rounds, st.prompts_per_step // job.dist.dp
    kept, round_stats, sampled_at = [], {}, None
    for step in range(state.step, st.steps):
        t0 = time.perf_counter()
        generated = 0.0
        if rejection:
            rnd, j = divmod(step, per_round)
            if sampled_at != rnd:  # a new round (or the resumed one): sample, grade, keep
                kept, round_stats = kept_round(job, engine, rnd, first_step=j == 0)
                sampled_at, generated = rnd, round_stats["generated_tokens"] if j == 0 else 0.0
            samples, n_prompts = kept_batch(kept, j, per_rank), min(per_rank, len(kept))
            labels = len(job.prompts.problems)  # round 0 graded every problem of the split
        else:
            prompts = job.prompts.step(step, st.prompts_per_step)
            samples, n_prompts = solution_samples(prompts, responses), len(prompts.indices)
            labels = job.prompts.distinct_until(step, st.prompts_per_step)
        batch = to_batch(samples, job.assets.pad_id)
        train_metrics = policy.train(batch, loss, st.updates_per_step)
        if engine is not None:
            engine.sync_weights(policy)  # lazy: the next round's generation refits
        counters = StepCounters(prompts=n_prompts, sequences=len(samples), generated_tokens=generated,
                                trained_sequences=len(samples)).all_reduce(job.dp_group)
        state.ledger.labels_consumed = labels
        metrics = {**rollout_metrics(samples, {}), **train_metrics, "trained_seqs": counters.trained_sequences}
        if rejection:
            metrics["sft_kept_frac"] = round_stats["kept_frac"]
        if job.end_step(step, policy, state, counters, metrics, t0):
            return True
    if engine is not None:
        engine.close()  # the final checkpoint and evaluation run without vLLM's memory
    job.finish(policy, state)
    return False
