"""One stage as one job: the parts its loop uses, each built once, each with one job.

    job = StageJob(plan, "opd", preemption)           # distributed init at the trained model's layout
    job.prompts    PromptStream   this rank's prompts of a step, seeds
    job.store      RunStore       parents' checkpoints, metrics.jsonl, checkpoints, lineage, COMPLETE
    job.assets     ModelAssets    tokenizer, stop and pad ids of the stage's starting checkpoint
    job.evaluator  Evaluator      avg@k of the final policy on the plan's eval sets
    policy, state = job.load_policy()            # trainable, from the parent (or resumed); ``Policy`` interface
    teacher = job.load_teacher()                 # frozen, at the teacher's own layout (``policy.load.LoadedModel``)
    scorer = teacher.scorer(job.dist.dp_rank)    # ... serving this rank's rows: ``Scorer`` interface
    engine = job.make_engine(job.policy_model, trainer=policy)   # rollouts, memory phases included (rollout.colocation)
    stop = job.end_step(step, policy, state, counters, metrics, t0)   # ledger, log, checkpoint, preemption
    job.finish(policy, state)                    # final checkpoint, evaluation, lineage, COMPLETE

The loops (``grpo.py``, ``fkl_warmup.py``, ``opd.py``) hold the algorithm; nothing here branches on stage kind
beyond reading the kind registry, and no part is handed down to ``rollout/`` or ``eval/`` (they take explicit
arguments).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from megatron_s2d.config import PlanConfig
from megatron_s2d.config.validate import engine_for, split_parts, vllm_tp
from megatron_s2d.data.prompts import encode_prompt
from megatron_s2d.data.split_store import read_split
from megatron_s2d.data.sources import load_source
from megatron_s2d.errors import S2DError, read_json
from megatron_s2d.eval.runner import DataParallel, Evaluator
from megatron_s2d.rollout.base import SamplingParams
from megatron_s2d.runtime.dist import DistInfo, data_parallel_group, init_distributed
from megatron_s2d.checkpoint.assets import ModelAssets
from megatron_s2d.stages.counters import StageState, StepCounters
from megatron_s2d.stages.layout import RunLayout
from megatron_s2d.stages.prompts import PromptStream, StepPrompts
from megatron_s2d.stages.store import RunStore

if TYPE_CHECKING:
    from megatron_s2d.policy.interface import Policy, Scorer
    from megatron_s2d.policy.load import LoadedModel

LOGGED = ("reward_mean", "pg_loss_mean", "kl_mean", "reverse_kl_mean", "clip_frac", "entropy_mean",
          "response_len_mean", "truncation_rate", "zero_variance_frac", "logprob_mismatch_mean", "nll_mean")


def plan_evaluator(plan: PlanConfig, log=print) -> Evaluator:
    """The plan's evaluation: its eval sets, sampling and grader (the same for every route of the run: paired)."""
    ev = plan.eval
    sets = [(e.name, load_source(e.source, e.limit, log=log)) for e in plan.data.eval]
    return Evaluator(sets=sets, k=ev.k, temperature=ev.temperature, top_p=ev.top_p,
                     max_new_tokens=ev.max_new_tokens, instruction=plan.data.instruction, seed=plan.seed,
                     graders=(plan.grader,), top_k=ev.top_k)


def trainable_policy(model, stage):
    """The stage's trainable policy over ``model`` (a ``policy.model.MegatronModel`` whose weights are loaded: the
    optimizer copies them): its optimizer, its LR schedule over the stage's ``steps x updates_per_step`` optimizer
    updates."""
    from megatron_s2d.policy.trainer import TrainablePolicy

    return TrainablePolicy(model, stage.optim, total_updates=stage.steps * stage.updates_per_step)


class StageJob:
    def __init__(self, plan: PlanConfig, stage_name: str, preemption=None, bridge=None):
        by_name = {s.name: s for s in plan.stages}
        if stage_name not in by_name:
            raise S2DError(f"stage {stage_name!r} is not in the plan; stages: {sorted(by_name)}")
        self.plan, self.stage = plan, by_name[stage_name]
        self.role = self.stage.trains
        self.preemption = preemption
        self.bridge = bridge  # runtime.bridge.Bridge: rollout.placement separate (this job is the trainer side)
        self._engines: list = []  # engines on generation ranks of their own: told to stop when the job ends
        self.resumed_from = None  # the training checkpoint load_policy resumed from
        mcfg = plan.models[self.role]
        self.dist: DistInfo = init_distributed(mcfg.tp, mcfg.pp, seed=plan.seed)
        self.layout = RunLayout.of(plan.run_dir)
        self.store = RunStore(self.layout, plan, self.stage, self.dist.is_main)
        self.init_dir = self.store.checkpoint_of(self.stage.init, self.role)
        self.assets = ModelAssets.load(self.init_dir)
        problems = [p for part in split_parts(self.stage.split) for p in read_split(self.layout.data, part)]
        self.prompts = PromptStream(problems, [encode_prompt(self.assets.tokenizer, p, plan.data.instruction) for p in problems],
                                    seed=plan.seed, stage=self.stage.name, split=self.stage.split,
                                    dp_rank=self.dist.dp_rank, dp_size=self.dist.dp,
                                    max_prompt_tokens=plan.data.max_prompt_tokens)
        self.evaluator = plan_evaluator(plan, log=self.log) if self.stage.eval else None
        self.memory_trace: list[str] = []  # the memory phases (rollout.colocation), saves and evaluations, in order
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the stage's lock while the loop runs (rank 0 holds it; a refusal reaches every rank): a second job
        of the same stage (a resubmitted SLURM job next to a running one) fails at once, naming the holder."""
        from megatron_s2d.runtime.locks import hold_lock_collective

        with hold_lock_collective(self.layout.stage_lock(self.stage.name),
                                  f"stage {self.stage.name!r} of {self.layout.root}"):
            yield

    # ------------------------------------------------------------------------------------------ models
    def load_policy(self) -> "tuple[Policy, StageState]":
        """The trainable policy with its stage state: resumed from the stage's latest checkpoint if there is one,
        else initialised from the parent stage's final checkpoint (or the base model). ``self.policy_model`` is the
        ``LoadedModel`` under it (what ``make_engine`` generates with)."""
        from megatron_s2d.checkpoint.train_ckpt import load_train_checkpoint, resume_checkpoint
        from megatron_s2d.policy.load import load_model

        state = StageState()
        resume = resume_checkpoint(self.store.checkpoints, log=self.log)
        if resume is not None:
            self._check_resume_config(resume)
        # fresh: the parent's weights, loaded before the optimizer is built (its fp32 main params copy them);
        # resumed: the checkpoint restores weights and optimizer together
        self.policy_model = load_model(self.init_dir, self.plan.models[self.role], assets=self.assets,
                                       micro_batch_tokens=self.stage.micro_batch_tokens, seed=self.plan.seed,
                                       weights=resume is None)
        policy = trainable_policy(self.policy_model.model, self.stage)
        if resume is not None:
            state = RunStore.restored(load_train_checkpoint(policy, resume))
            self.resumed_from = resume
            self.log(f"resumed from {resume} at step {state.step}")
        else:
            self.store.start_fresh()
        self.store.metrics.truncate(state.step)
        return policy, state

    def _check_resume_config(self, resume) -> None:
        """The checkpoint a stage resumes from was made with the plan's result-changing settings (else S2DError
        naming each changed field, on every rank: they all read the same file); neutral changes are recorded."""
        from megatron_s2d.stages.provenance import Recorded, check_drift, record_neutral_changes

        state_file = resume / "trainer_state.json"
        trainer_state = read_json(state_file, "restore it, or redo the stage with `s2d run PLAN --restart STAGE`")
        saved = trainer_state.get("config") or {}
        if "fields" not in saved:
            self.log(f"{state_file} records no settings (an older megatron-s2d): config drift not checked")
            return
        neutral = check_drift(self.plan, self.stage, Recorded(saved["fields"], str(state_file), False))
        if self.dist.is_main:
            record_neutral_changes(self.layout, self.stage, neutral, trainer_state["step"], log=self.log)

    def load_frozen(self, ref: str | None, role: str) -> "LoadedModel":
        """A frozen model (teacher or reference) from a stage's final checkpoint or the base, at the role's own
        TP/PP layout (``models.<role>.tp/pp``); ``.scorer(dp_rank)`` serves this rank's rows (``policy.scorer``)."""
        from megatron_s2d.policy.load import load_model
        from megatron_s2d.runtime.groups import model_groups

        path = self.store.checkpoint_of(ref, role)
        assets = ModelAssets.load(path)
        self.assets.check_same_tokenizer(assets)
        mcfg = self.plan.models[role]
        loaded = load_model(path, mcfg, groups=model_groups(mcfg.tp, mcfg.pp), assets=assets, seed=self.plan.seed,
                            micro_batch_tokens=self.stage.micro_batch_tokens)
        if not loaded.groups.is_global:
            self.log(f"{role} at its own layout tp={mcfg.tp} pp={mcfg.pp} ({loaded.groups.dp} replicas) next to the "
                     f"{self.role} at tp={self.dist.tp} pp={self.dist.pp} (dp={self.dist.dp})")
        return loaded

    def load_teacher(self) -> "LoadedModel":
        return self.load_frozen(self.stage.teacher, "teacher")

    def load_reference(self) -> "Scorer":
        """The frozen starting point of the policy (GRPO's KL reference), at the job's layout."""
        return self.load_frozen(self.stage.init, self.role).scorer(self.dist.dp_rank)

    def make_engine(self, loaded: "LoadedModel", trainer=None, *, n: int = 1, topk: int = 0, salt: int = 0,
                    start_step: int = 0, per_step: bool = True):
        """The stage's rollout engine generating with ``loaded`` (``self.policy_model``, or a frozen teacher), with
        the memory phases of ``rollout.colocation`` around each generation: ``trainer`` (the ``TrainablePolicy``) is
        the policy whose grads and optimizer state leave the device meanwhile. ``n``, ``topk``, ``salt``: what every
        step asks for (:meth:`sampling`), from ``start_step`` on: an engine on generation ranks of their own
        (``rollout.placement: separate``) runs ahead on them (``rollout.remote``). ``per_step`` False: the stage
        asks other requests than one per step of its prompt stream (rejection SFT's rounds): nothing is asked ahead."""
        from megatron_s2d.models.memory import max_model_len
        from megatron_s2d.rollout.factory import make_engine

        if self.bridge is not None:
            engine = self._remote_engine(loaded, trainer, n, topk, salt, start_step, per_step)
            self._engines.append(engine)
            return engine

        shield = self.preemption.shield_children if self.preemption is not None else contextlib.nullcontext
        engine = engine_for(self.stage.rollout)
        self.log(f"rollouts on {engine}" + (f" (vLLM tp={vllm_tp(self.plan, self.stage)}, colocated)"
                                            if engine == "vllm" else ""))
        return make_engine(engine, loaded, dp_rank=self.dist.dp_rank, work_dir=self.store.dir,
                           stop_ids=self.assets.stop_ids, pad_id=self.assets.pad_id,
                           vllm=self.stage.rollout.vllm, seed=self.plan.seed, shield=shield, trainer=trainer,
                           max_model_len=max_model_len(self.plan, self.stage.rollout.max_new_tokens),
                           gpu_memory_utilization=self._vllm_fraction() if engine == "vllm" else None,
                           trace=self.memory_trace, max_batch_tokens=self.stage.rollout.max_batch_tokens)

    def _vllm_fraction(self, generation_ranks: bool = False) -> float | None:
        """vLLM's share of a GPU: the plan's value, or derived from the estimate of what stays resident while it
        generates (``models.memory.vllm_memory_fraction``; on generation ranks of their own, ``generation_ranks``:
        ``generation_vllm_fraction``, the CUDA context and the transfer's destination model; those ranks are assumed
        to have this rank's kind of GPU, one SLURM allocation). None on CPU, where vLLM sizes by ``cpu_kvcache_gib``."""
        import torch

        if not torch.cuda.is_available():
            return None
        from megatron_s2d.models.memory import generation_vllm_fraction, vllm_memory_fraction

        fraction = generation_vllm_fraction if generation_ranks else vllm_memory_fraction
        return fraction(self.plan, self.stage, self._archs(), torch.cuda.mem_get_info()[1] / 2**30)

    def _archs(self) -> dict:
        """The ArchSpec of each model the stage holds (the memory estimate's input)."""
        return {role: self.assets.arch if role == self.role else
                ModelAssets.load(self.store.checkpoint_of(self.stage.teacher, role)).arch
                for role in self.stage.models()}

    def _remote_engine(self, loaded, trainer, n: int, topk: int, salt: int, start_step: int, per_step: bool):
        from megatron_s2d.models.memory import max_model_len
        from megatron_s2d.rollout.remote import make_remote_engine

        def lookahead(step: int):  # what step ``step`` asks for: the stage's prompt stream is a function of the step
            prompts = self.prompts.step(step, self.stage.prompts_per_step)
            return prompts.prompt_ids, self.sampling(prompts, n, topk=topk, salt=salt)

        frozen = trainer is None or loaded.model is not trainer.base  # a teacher generates: nothing to push
        kind = engine_for(self.stage.rollout)
        engine = make_remote_engine(
            self.bridge, loaded, trainer=None if frozen else trainer, gen_cfg=self.plan.models[self.stage.samples_from],
            trainer_layout=(self.dist.tp, self.dist.pp), dp_rank=self.dist.dp_rank, stop_ids=self.assets.stop_ids,
            pad_id=self.assets.pad_id, rollout=self.stage.rollout, engine=kind,
            lookahead=lookahead if per_step else None,
            start_step=start_step, end_step=self.stage.steps, resumed_from=None if frozen else self.resumed_from,
            work_dir=self.store.dir, max_model_len=max_model_len(self.plan, self.stage.rollout.max_new_tokens),
            gpu_memory_utilization=self._vllm_fraction(generation_ranks=True) if kind == "vllm" else None)
        what = (f"vLLM tp={vllm_tp(self.plan, self.stage)}" if kind == "vllm" else "megatron sampler")
        self.log(f"rollouts on {len(self.bridge.generators)} generation ranks of their own ({what}), "
                 f"{len(self.bridge.trainers)} ranks train; max_staleness={self.stage.rollout.max_staleness}")
        return engine

    def close_engines(self) -> None:
        """Stop the generation ranks (their server exits), whatever way the loop ended."""
        for engine in self._engines:
            engine.close()
        self._engines.clear()

    # ------------------------------------------------------------------------------------------ a step
    def sampling(self, prompts: StepPrompts, n: int, topk: int = 0, salt: int = 0) -> SamplingParams:
        r = self.stage.rollout
        return SamplingParams(n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop_token_ids=self.assets.stop_ids,
                              logprob_topk=topk, seed=prompts.seed(salt))

    def end_step(self, step: int, policy, state: StageState, counters: StepCounters, metrics: dict,
                 t0: float) -> bool:
        """Ledger, metrics line, periodic checkpoint; True when the job must stop now (preempted: saved)."""
        state.step = step + 1
        state.ledger.add(counters)
        # the job's wall time so far (loading, the step, anything between steps), once: finish adds the rest
        now = time.perf_counter()
        state.ledger.wall_time_s += now - self.started
        self.started = now
        metrics = dict(metrics, step_time_s=time.perf_counter() - t0)
        line = self.store.metrics.append(step, metrics)
        shown = " ".join(f"{k}={line[k]:.4g}" for k in LOGGED if k in line)
        self.log(f"step {step + 1}/{self.stage.steps} {shown}")
        every = self.stage.save_every
        stop = self.preemption is not None and self.preemption.should_stop(distributed=True)
        if stop or (every and state.step % every == 0 and state.step < self.stage.steps):
            path = self.save(policy, state)
            self.log(f"checkpoint {path}" + (" (preempted: exiting for requeue)" if stop else ""))
        return stop

    def save(self, policy, state: StageState):
        self.memory_trace.append("save")  # the engine is asleep here: it sleeps at the end of every generation
        extra = {}
        for engine in self._engines:  # generation ranks of their own: the rollouts they made ahead (rollout.remote)
            extra.update(engine.checkpoint_files())
        return self.store.save(policy, state, self.assets, {"tp": self.dist.tp, "pp": self.dist.pp}, extra)

    def finish(self, policy, state: StageState) -> None:
        """Final checkpoint, evaluation, lineage, then the COMPLETE marker (written last)."""
        import json

        import torch

        from megatron_s2d.checkpoint.train_ckpt import latest_checkpoint

        state.ledger.wall_time_s += time.perf_counter() - self.started
        self.started = time.perf_counter()
        final = latest_checkpoint(self.store.checkpoints)
        if final is None or read_json(final / "trainer_state.json")["step"] != state.step:
            final = self.save(policy, state)
        results = None
        if self.evaluator is not None:
            results = {"label": self.stage.name, "results": self.evaluate(policy, self.stage.name)}
        self.store.finish(final, state, self.init_dir, results)
        self.store.metrics.close()
        torch.distributed.barrier()
        self.log(f"complete: {final}")

    def evaluate(self, policy, label: str) -> dict:
        """avg@k of the trained ``policy`` on the megatron sampler, as one generation phase (its grads and optimizer
        state off the device meanwhile: the sampler's KV cache gets that memory)."""
        from megatron_s2d.rollout.colocation import ColocatedEngine, TrainerMemory
        from megatron_s2d.rollout.factory import make_sampler

        sampler = make_sampler(policy, stop_ids=self.assets.stop_ids, pad_id=self.assets.pad_id,
                               max_batch_tokens=self.stage.rollout.max_batch_tokens)
        engine = ColocatedEngine(sampler, trainer=TrainerMemory(policy), trace=self.memory_trace)
        self.log(f"evaluating {label}: avg@{self.plan.eval.k} on {', '.join(n for n, _ in self.evaluator.sets)}")
        self.memory_trace.append("eval")
        with engine.generation():
            return self.evaluator.evaluate(engine, self.assets.tokenizer, self.assets.stop_ids, dp=self._dp(),
                                           label=label, log=self.log, show_progress=self.dist.is_main)

    # ------------------------------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[{self.stage.name}] {msg}", flush=True)

    @property
    def dp_group(self):
        return data_parallel_group()

    def _dp(self) -> DataParallel:
        return DataParallel(self.dist.dp_rank, self.dist.dp, data_parallel_group())
