"""One stage as one job: the parts its loop uses, each built once, each with one job.

    job = StageJob(plan, "opd", preemption)           # distributed init at the trained model's layout
    job.prompts    PromptStream   this rank's prompts of a step, seeds
    job.store      RunStore       parents' checkpoints, metrics.jsonl, checkpoints, lineage, COMPLETE
    job.assets     ModelAssets    tokenizer, stop and pad ids of the stage's starting checkpoint
    job.evaluator  Evaluator      avg@k of the final policy on the plan's eval sets
    policy, state = job.load_policy()            # trainable, from the parent (or resumed); ``Policy`` interface
    teacher = job.load_teacher()                 # frozen, at the teacher's own layout; ``Scorer`` interface
    engine = job.make_engine(policy)             # the stage's rollout engine, memory phases included (rollout.colocation)
    stop = job.end_step(step, policy, state, counters, metrics, t0)   # ledger, log, checkpoint, preemption
    job.finish(policy, state)                    # final checkpoint, evaluation, lineage, COMPLETE

The loops (``grpo.py``, ``fkl_warmup.py``, ``opd.py``) hold the algorithm; nothing here branches on stage kind
beyond reading the kind registry, and no part is handed down to ``rollout/`` or ``eval/`` (they take explicit
arguments).
"""

from __future__ import annotations

import contextlib
import time

from megatron_s2d.config import PlanConfig
from megatron_s2d.config.kinds import kind_of
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

LOGGED = ("reward_mean", "kl_mean", "reverse_kl_mean", "clip_frac", "entropy_mean", "response_len_mean",
          "truncation_rate", "zero_variance_frac", "logprob_mismatch_mean", "nll_mean")


def plan_evaluator(plan: PlanConfig, log=print) -> Evaluator:
    """The plan's evaluation: its eval sets, sampling and grader (the same for every route of the run: paired)."""
    ev = plan.eval
    sets = [(e.name, load_source(e.source, e.limit, log=log)) for e in plan.data.eval]
    return Evaluator(sets=sets, k=ev.k, temperature=ev.temperature, top_p=ev.top_p,
                     max_new_tokens=ev.max_new_tokens, instruction=plan.data.instruction, seed=plan.seed,
                     graders=(plan.grader,), top_k=ev.top_k)


def trainable_policy(arch, model_cfg, stage, seed: int):
    """The stage's trainable policy (random weights until loaded): its optimizer, its LR schedule over the stage's
    ``steps x updates_per_step`` optimizer updates, its micro-batch budget."""
    from megatron_s2d.policy.megatron_policy import MegatronPolicy

    return MegatronPolicy(arch, model_cfg, stage.optim, total_updates=stage.steps * stage.updates_per_step, seed=seed,
                          micro_batch_tokens=stage.micro_batch_tokens)


class StageJob:
    def __init__(self, plan: PlanConfig, stage_name: str, preemption=None):
        by_name = {s.name: s for s in plan.stages}
        if stage_name not in by_name:
            raise S2DError(f"stage {stage_name!r} is not in the plan; stages: {sorted(by_name)}")
        self.plan, self.stage, self.kind = plan, by_name[stage_name], kind_of(by_name[stage_name])
        self.role = self.kind.trains
        self.preemption = preemption
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
    def load_policy(self):
        """The trainable policy with its stage state: resumed from the stage's latest checkpoint if there is one,
        else initialised from the parent stage's final checkpoint (or the base model)."""
        from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint
        from megatron_s2d.checkpoint.train_ckpt import load_train_checkpoint, resume_checkpoint

        policy = trainable_policy(self.assets.arch, self.plan.models[self.role], self.stage, self.plan.seed)
        state = StageState()
        resume = resume_checkpoint(self.store.checkpoints, log=self.log)
        if resume is not None:
            self._check_resume_config(resume)
            state = RunStore.restored(load_train_checkpoint(policy, resume))
            self.log(f"resumed from {resume} at step {state.step}")
        else:
            self.store.start_fresh()
            load_model_checkpoint(policy.module, self.init_dir)
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

    def load_frozen(self, ref: str | None, role: str):
        """A frozen model (teacher or reference) from a stage's final checkpoint or the base, at the role's own
        TP/PP layout (``models.<role>.tp/pp``; see ``policy.scorer`` for how rows are routed)."""
        from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint
        from megatron_s2d.policy.megatron_policy import MegatronPolicy
        from megatron_s2d.policy.scorer import FrozenScorer
        from megatron_s2d.runtime.groups import model_groups

        path = self.store.checkpoint_of(ref, role)
        assets = ModelAssets.load(path)
        self.assets.check_same_tokenizer(assets)
        mcfg = self.plan.models[role]
        groups = model_groups(mcfg.tp, mcfg.pp)
        model = MegatronPolicy(assets.arch, mcfg, optim=None, seed=self.plan.seed, groups=groups, initialize=False,
                               micro_batch_tokens=self.stage.micro_batch_tokens)
        load_model_checkpoint(model.module, path)
        if not groups.is_global:
            self.log(f"{role} scorer at its own layout tp={mcfg.tp} pp={mcfg.pp} ({groups.dp} replicas) next to the "
                     f"{self.role} at tp={self.dist.tp} pp={self.dist.pp} (dp={self.dist.dp})")
        scorer = FrozenScorer(model, self.dist.dp_rank)
        scorer.checkpoint = path
        return scorer

    def load_teacher(self):
        return self.load_frozen(self.stage.teacher, "teacher")

    def load_reference(self):
        """The frozen starting point of the policy (GRPO's KL reference)."""
        return self.load_frozen(self.stage.init, self.role)

    def make_engine(self, model, trainer=None):
        """The stage's rollout engine generating with ``model`` (the policy, or a frozen teacher), with the memory
        phases of ``rollout.colocation`` around each generation: ``trainer`` (default ``model``, when it trains) is
        the policy whose grads and optimizer state leave the device meanwhile."""
        from megatron_s2d.models.memory import max_model_len
        from megatron_s2d.rollout.factory import make_engine

        shield = self.preemption.shield_children if self.preemption is not None else contextlib.nullcontext
        engine = engine_for(self.stage.rollout)
        self.log(f"rollouts on {engine}" + (f" (vLLM tp={vllm_tp(self.plan, self.stage)}, colocated)"
                                            if engine == "vllm" else ""))
        if trainer is None and getattr(model, "optimizer", None) is not None:
            trainer = model
        return make_engine(engine, model, ckpt_dir=getattr(model, "checkpoint", self.init_dir),
                           work_dir=self.store.dir, stop_ids=self.assets.stop_ids, pad_id=self.assets.pad_id,
                           vllm=self.stage.rollout.vllm, seed=self.plan.seed, shield=shield, trainer=trainer,
                           max_model_len=max_model_len(self.plan, self.stage.rollout.max_new_tokens),
                           gpu_memory_utilization=self._vllm_fraction() if engine == "vllm" else None,
                           trace=self.memory_trace, max_batch_tokens=self.stage.rollout.max_batch_tokens)

    def _vllm_fraction(self) -> float | None:
        """vLLM's share of this GPU (``models.memory.vllm_memory_fraction``: the plan's value, or derived from the
        estimate of what stays resident while it generates); None on CPU, where vLLM sizes by ``cpu_kvcache_gib``."""
        import torch

        if not torch.cuda.is_available():
            return None
        from megatron_s2d.config.kinds import models_of
        from megatron_s2d.models.memory import vllm_memory_fraction

        archs = {role: self.assets.arch if role == self.role else
                 ModelAssets.load(self.store.checkpoint_of(self.stage.teacher, role)).arch
                 for role in models_of(self.stage)}
        return vllm_memory_fraction(self.plan, self.stage, archs, torch.cuda.mem_get_info()[1] / 2**30)

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
        state.ledger.wall_time_s += time.perf_counter() - t0
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
        return self.store.save(policy, state, self.assets, {"tp": self.dist.tp, "pp": self.dist.pp})

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

    def evaluate(self, model, label: str) -> dict:
        """avg@k of ``model`` on the megatron sampler, as one generation phase (a trained policy's grads and
        optimizer state off the device meanwhile: the sampler's KV cache gets that memory)."""
        from megatron_s2d.rollout.colocation import ColocatedEngine, TrainerMemory
        from megatron_s2d.rollout.megatron_sampler import MegatronSampler

        sampler = MegatronSampler(model.module, model.arch, eos_token_ids=list(self.assets.stop_ids),
                                  pad_token_id=self.assets.pad_id, max_batch_tokens=self.stage.rollout.max_batch_tokens)
        trainer = TrainerMemory(model) if getattr(model, "optimizer", None) is not None else None
        engine = ColocatedEngine(sampler, trainer=trainer, trace=self.memory_trace)
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
