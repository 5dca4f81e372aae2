"""The dry run's price of a plan: every job's step time, wall time and GPU-hours, for its placement and, for a stage
that generates, for the other placement too; the plan's total GPU-hours. An analytic throughput model on a device
profile (:func:`device_for`: H100 for GPU plans, this 2-core CPU, measured, for toy plans); every constant sits in
:mod:`megatron_s2d.launch.price_constants` with its source. Lengths are means, fractions of the plan's caps
(``PROMPT_FRACTION`` x ``data.max_prompt_tokens``, ``RESPONSE_FRACTION`` x ``max_new_tokens``).

One step of a stage, by phase (seconds):
  generate  one engine replica (tp_g x pp_g GPUs: :func:`models.memory.generation_layout`) runs its share R of the
            step's rows: prefill (2 x params x prompt tokens at ``score_mfu``), then decode. A decode step of B
            active rows at mean context c costs max(bytes / (memory bandwidth x ``decode_bw_efficiency``), FLOPs /
            (peak x ``score_mfu``)) + the megatron sampler's fixed cost (layers x ``sampler_step_s_per_layer`` +
            B x ``sampler_row_step_s``); bytes = the replica's weights per GPU + B x c x KV bytes per token per GPU;
            FLOPs = B x (2 x params + 4 x layers x q width x c) / tp_g. vLLM holds the rows its KV cache fits at the
            mean length (at most ``VLLM_MAX_SEQS``), batched continuously: steps = max(max_new_tokens, R x response
            / rows held), the longest response bounding it. The megatron sampler runs chunks of (KV slots /
            max_model_len) rows, max_new_tokens steps each. Active rows per step = R x response / steps.
  score     forward-only log-probs, 2 x params x tokens per model (the policy's old log-probs in GRPO and OPD, the
            teacher's in OPD, the reference's when grpo.kl_beta > 0) / (GPUs x peak x ``score_mfu``)
  reward    rows / data-parallel ranks x ``reward_s_per_sample`` / ``reward_workers_per_rank`` (GRPO; OPD with a
            task reward; teacher_sft's rejection rounds)
  train     6 x params x tokens (x ``RECOMPUTE_FACTOR`` with recompute) / (GPUs x peak x ``train_mfu``), an FP8
            recipe x ``fp8_train_speedup``
  sync      new weights into the engine (a trained generating model only): colocated vLLM, each vLLM rank's weights
            (/ its tp): other pipeline stages' part over the link, its own copied in memory (read + write); the
            colocated megatron sampler generates with the trainer's weights (0). Separate: each generation GPU's
            share over the link from the trainers, again over the generation ranks' broadcast when there are
            several replicas. Links: NVLink within a node, InfiniBand across, x ``link_efficiency``.

Per placement (W GPUs; separate: N generate, T = W - N train; k = rollout.max_staleness):
  colocated        step = generate(W) + score(W) + reward + train(W) + sync
  separate, k = 0  step = generate(N) + score(T) + reward + train(T) + sync              (serial)
  separate, k >= 1 step = max(generate(N), score(T) + reward + train(T) + sync)         (pipelined; + 1 generate)
  wall = job start-up + steps x step + one-off phases + the final evaluation; GPU-hours = W x wall / 3600 (the job
  holds its W GPUs throughout, a side that waits included).
One-off phases: teacher_sft's rejection rounds (every split prompt x sft.samples_per_prompt per round, graded, then
a refit); the first generation of a pipelined stage. The forward-KL warmup generates every step's teacher samples
before it trains (one phase): priced as its steps' generate phases, the same sum. The final evaluation
(``stage.eval``): the megatron sampler on the trained model over the trainers (colocated: every GPU), eval problems
x eval.k rows at eval.max_new_tokens, graded; ``base_eval``: each base model in turn, the same way.

:func:`choose_placement` is the rule for ``rollout.placement: auto``: the separate option is priced for every
generation-rank count N in :func:`separate_candidates` (multiples of one engine replica whose trainers hold whole
replicas of the models they run and split the step's prompts evenly); the one with the least wall time (ties: the
fewest generation ranks) whose memory fits both sides is compared with colocated; the cheaper in GPU-hours wins,
colocated on a tie or when no separate option fits. Staleness is the stage's own (k = 0 is serial, so separate
rarely wins on-policy).

Not modelled: pipeline bubbles, padding inside micro-batches, checkpoint saves, a response distribution beyond its
mean and its cap, GPU job start-up (model loading, vLLM start-up and CUDA graph capture: not measured yet), queueing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_s2d.config.schema import (
    GRPOStageConfig, ModelConfig, OPDStageConfig, PlanConfig, StageBase, TeacherSFTStageConfig,
)
from megatron_s2d.config.validate import can_separate, split_parts, validate_plan
import megatron_s2d.launch.price_constants as C
from megatron_s2d.launch.price_constants import DeviceProfile
from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.models.memory import (
    CUDA_CONTEXT_NCCL_GIB, FP8_CACHE_BYTES, GIB, VLLM_MAX_SEQS, SamplerMemory, StageMemory, dtype_bytes,
    estimate_base_eval_memory, estimate_separate_memory, estimate_stage_memory, generation_layout,
    kv_bytes_per_token, max_model_len, params_on_heaviest_stage, sampler_memory,
)


def device_for(plan: PlanConfig) -> DeviceProfile:
    """The device a plan's jobs are priced on: a toy-world plan on this 2-core CPU (the main job's machine), any
    other on H100s (the recipes' hardware: base_gpu.yaml's budget is an H100's)."""
    return C.CPU_2CORE if plan.toy_world else C.H100


def _world(plan: PlanConfig) -> int:
    return plan.launch.nodes * plan.launch.procs_per_node


@dataclass(frozen=True)
class Lengths:
    """Mean tokens of a prompt and a response, and the response cap (one generation's settings)."""

    prompt: float
    response: float
    max_new: int

    @property
    def tokens(self) -> float:
        return self.prompt + self.response


def lengths(plan: PlanConfig, max_new_tokens: int) -> Lengths:
    return Lengths(C.PROMPT_FRACTION * plan.data.max_prompt_tokens, C.RESPONSE_FRACTION * max_new_tokens,
                   max_new_tokens)


# ------------------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Engine:
    """One rollout engine replica: the model it runs, its layout and how many rows it holds at once."""

    arch: ArchSpec
    weight_bytes: int  # per parameter
    tp: int
    pp: int
    sampler: bool  # the megatron sampler (static chunks) or vLLM (continuous batching)
    max_rows: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def decode_step_s(dev: DeviceProfile, eng: Engine, rows: float, context: float) -> float:
    """One decode step of ``rows`` active rows at mean context ``context`` on one replica (pipeline stages run one
    after another: the step's time is the whole model's bytes / tp)."""
    a = eng.arch
    weights = a.num_params * eng.weight_bytes / eng.tp
    kv = rows * context * kv_bytes_per_token(a, eng.tp, 1, eng.weight_bytes)
    flops = rows * (2 * a.num_params + 4 * a.num_layers * a.num_attention_heads * a.head_dim * context) / eng.tp
    t = max((weights + kv) / (dev.mem_bytes_per_s * dev.decode_bw_efficiency), flops / (dev.peak_flops * dev.score_mfu))
    if eng.sampler:
        t += a.num_layers * dev.sampler_step_s_per_layer + rows * dev.sampler_row_step_s
    return t


def generate_s(dev: DeviceProfile, eng: Engine, rows: float, ln: Lengths) -> float:
    """One replica generating ``rows`` rows (prefill + decode; see the module docstring)."""
    if rows <= 0:
        return 0.0
    prefill = rows * ln.prompt * 2 * eng.arch.num_params / (eng.tp * dev.peak_flops * dev.score_mfu)
    if eng.sampler:
        steps = math.ceil(rows / eng.max_rows) * ln.max_new
    else:
        steps = max(ln.max_new, rows * ln.response / eng.max_rows)
    active = rows * ln.response / steps
    return prefill + steps * decode_step_s(dev, eng, active, ln.prompt + ln.response / 2)


def forward_s(dev: DeviceProfile, params: int, tokens: float, gpus: int, m: ModelConfig) -> float:
    """Forward-only log-probs of ``tokens`` tokens by a model of ``params`` parameters over ``gpus`` GPUs."""
    speedup = dev.fp8_score_speedup if m.fp8 else 1.0
    return 2 * params * tokens / (gpus * dev.peak_flops * dev.score_mfu * speedup)


def train_s(dev: DeviceProfile, params: int, tokens: float, gpus: int, m: ModelConfig) -> float:
    """One step's training (every update of it) on ``tokens`` tokens over ``gpus`` GPUs."""
    flops = 6 * params * tokens * (C.RECOMPUTE_FACTOR if m.recompute else 1.0)
    speedup = dev.fp8_train_speedup if m.fp8 else 1.0
    return flops / (gpus * dev.peak_flops * dev.train_mfu * speedup)


def reward_s(dev: DeviceProfile, rows: float, ranks: int) -> float:
    """Grading ``rows`` responses, each of ``ranks`` ranks its share with its worker processes."""
    return rows / max(1, ranks) * dev.reward_s_per_sample / dev.reward_workers_per_rank


def _link(dev: DeviceProfile, cross_node: bool) -> float:
    return (dev.inter_node_bytes_per_s if cross_node else dev.intra_node_bytes_per_s) * dev.link_efficiency


def sync_s(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], dev: DeviceProfile,
           generation_ranks: int) -> float:
    """New weights into the engine after a step (``generation_ranks`` 0: colocated); see the module docstring."""
    if stage.samples_from != stage.trains:
        return 0.0  # a frozen teacher generates: nothing changes
    m, arch = plan.models[stage.trains], archs[stage.trains]
    tp_g, pp_g = generation_layout(plan, stage)
    gpn = plan.launch.procs_per_node
    vllm = stage.rollout.engine != "megatron"
    per_gpu = arch.num_params * dtype_bytes(m.dtype) / (tp_g * pp_g)  # what one engine GPU holds
    load = per_gpu / dev.engine_load_bytes_per_s if vllm else 0.0  # vLLM's load_weights; the sampler: a copy
    if not generation_ranks:
        if not vllm:
            return 0.0  # the colocated sampler generates with the trainer's own weights
        remote = per_gpu * (m.pp - 1) / m.pp  # the other pipeline stages' layers (every vLLM rank holds all)
        return remote / _link(dev, m.tp * m.pp > gpn) + load
    t = per_gpu / _link(dev, plan.launch.nodes > 1) + load
    if generation_ranks > tp_g * pp_g:  # replica 0 receives, then broadcasts to the others
        t += per_gpu / _link(dev, generation_ranks > gpn)
    return t


def rollout_engine(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], memory: StageMemory,
                   ln: Lengths) -> Engine:
    """The stage's engine replica, its rows at once from the memory estimate of the GPUs it runs on (vLLM: at the
    mean lengths ``ln``)."""
    m, arch = plan.models[stage.samples_from], archs[stage.samples_from]
    tp, pp = generation_layout(plan, stage)
    wb = dtype_bytes(m.dtype)
    if memory.sampler is not None:
        return Engine(arch, wb, tp, pp, True, max(1, memory.sampler.slots // max_model_len(
            plan, stage.rollout.max_new_tokens)))
    held = max(memory.vllm.kv_gib, 0.0) * GIB / kv_bytes_per_token(arch, tp, 1, wb) / ln.tokens
    return Engine(arch, wb, tp, 1, False, int(max(1, min(VLLM_MAX_SEQS, held))))


def problems_of(source: str, limit: int | None) -> int:
    """Problems a data set gives: its limit, else its known size (``KNOWN_PROBLEMS``), else 0 (unknown: local files
    are not read by a dry run)."""
    return limit if limit is not None else C.KNOWN_PROBLEMS.get(source, 0)


def split_problems(plan: PlanConfig, split: str) -> int:
    pool = problems_of(plan.data.pool, plan.data.pool_limit)
    return int(pool * sum(plan.data.split.fractions.get(p, 0.0) for p in split_parts(split)))


def evaluation_s(plan: PlanConfig, dev: DeviceProfile, arch: ArchSpec, m: ModelConfig, ranks: int,
                 smp: SamplerMemory) -> float:
    """One model's evaluation on the megatron sampler over ``ranks`` ranks (``smp``: its sampler's memory), graded."""
    rows = sum(problems_of(e.source, e.limit) for e in plan.data.eval) * plan.eval.k
    replicas = max(1, ranks // (m.tp * m.pp))
    ln = lengths(plan, plan.eval.max_new_tokens)
    eng = Engine(arch, dtype_bytes(m.dtype), m.tp, m.pp, True,
                 max(1, smp.slots // max_model_len(plan, plan.eval.max_new_tokens)))
    return generate_s(dev, eng, math.ceil(rows / replicas), ln) + reward_s(dev, rows, replicas)


# ------------------------------------------------------------------------------------------------- a job's price
@dataclass(frozen=True)
class Phases:
    """One step's phases in seconds (see the module docstring)."""

    generate: float = 0.0
    score: float = 0.0
    reward: float = 0.0
    train: float = 0.0
    sync: float = 0.0

    def describe(self, pipelined: bool) -> str:
        rest = f"{self.score:.1f}+{self.reward:.1f}+{self.train:.1f}+{self.sync:.1f}"
        return f"max({self.generate:.1f}, {rest})" if pipelined else f"{self.generate:.1f}+{rest}"


@dataclass(frozen=True)
class JobPrice:
    """One job's estimated times and GPU-hours on ``device``; ``other``: the same stage at the other placement."""

    job: str
    device: str
    placement: str  # "colocated" | "separate" | "-" (base_eval: no rollouts)
    gpus: int  # W: every GPU the job holds
    generation_ranks: int  # separate: N; else 0
    max_staleness: int
    steps: int
    phases: Phases
    step_s: float
    once_s: float  # one-off phases (see the module docstring)
    eval_s: float
    startup_s: float
    train_layout: str  # the trainers' models, "role:tp/pp/dp" (base_eval: the evaluated models)
    gen_layout: str  # the engine: kind, model, tp x replicas ("-" where nothing generates)
    fits: bool = True  # the memory estimate of every side fits launch.gpu_memory_gib
    other: "JobPrice | None" = None

    @property
    def pipelined(self) -> bool:
        return self.placement == "separate" and self.max_staleness >= 1

    @property
    def wall_s(self) -> float:
        return self.startup_s + self.steps * self.step_s + self.once_s + self.eval_s

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.wall_s / 3600

    @property
    def train_gpus(self) -> int:
        return self.gpus - self.generation_ranks


def trainer_roles(stage: StageBase, separate: bool) -> list[str]:
    """The models a stage's trainers hold: its models, less (separate) a teacher that only generates (the
    forward-KL warmup's: it lives on the generation ranks)."""
    return [r for r in stage.models() if not (separate and r == "teacher" and r == stage.samples_from != stage.trains)]


def _train_layout(plan: PlanConfig, roles: list[str], ranks: int) -> str:
    return " ".join(f"{r[0]}:{plan.models[r].tp}/{plan.models[r].pp}/{ranks // (plan.models[r].tp * plan.models[r].pp)}"
                    for r in roles)


def _gen_layout(plan: PlanConfig, stage: StageBase, ranks: int) -> str:
    tp, pp = generation_layout(plan, stage)
    engine = "sampler" if stage.rollout.engine == "megatron" else "vllm"
    return f"{engine} {stage.samples_from[0]}:{tp}/{pp}x{ranks // (tp * pp)}"


def price_stage(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], placement: str = "colocated",
                generation_ranks: int = 0, dev: DeviceProfile | None = None,
                rollout_lengths: Lengths | None = None) -> JobPrice:
    """``stage``'s job at ``placement`` ("colocated", or "separate" with ``generation_ranks`` of the world
    generating), at the stage's own ``rollout.max_staleness`` (separate only). ``rollout_lengths``: the mean prompt
    and response of its rollouts when known (a peer's published figures); default :func:`lengths`."""
    dev = dev or device_for(plan)
    world = _world(plan)
    separate = placement == "separate"
    n = generation_ranks if separate else 0
    trainers = world - n
    if separate:
        train_mem, gen_mem = estimate_separate_memory(plan, stage, archs, n)
    else:
        train_mem = gen_mem = estimate_stage_memory(plan, stage, archs)
    tm, tarch = plan.models[stage.trains], archs[stage.trains]
    dp = max(1, trainers // (tm.tp * tm.pp))
    ln = rollout_lengths or lengths(plan, stage.rollout.max_new_tokens)
    rows = stage.prompts_per_step * stage.rows_per_prompt()
    tokens = rows * ln.tokens
    generate, once = 0.0, 0.0
    if stage.generates():
        eng = rollout_engine(plan, stage, archs, gen_mem, ln)
        replicas = max(1, (n if separate else world) // eng.gpus)
        if isinstance(stage, TeacherSFTStageConfig):  # rejection rounds: the whole split, graded, once per round
            sampled = split_problems(plan, stage.split) * stage.sft.samples_per_prompt
            once = stage.sft.rounds * (generate_s(dev, eng, math.ceil(sampled / replicas), ln)
                                       + reward_s(dev, sampled, dp) + sync_s(plan, stage, archs, dev, n))
        else:
            generate = generate_s(dev, eng, math.ceil(rows / replicas), ln)
    score = 0.0
    if isinstance(stage, (GRPOStageConfig, OPDStageConfig)):  # the policy's old log-probs
        score = forward_s(dev, tarch.num_params, tokens, trainers, tm)
    if isinstance(stage, OPDStageConfig):  # the teacher's
        score += forward_s(dev, archs["teacher"].num_params, tokens, trainers, plan.models["teacher"])
    if isinstance(stage, GRPOStageConfig) and stage.grpo.kl_beta > 0:  # the reference's
        score += forward_s(dev, tarch.num_params, tokens, trainers, tm)
    graded = isinstance(stage, GRPOStageConfig) or (isinstance(stage, OPDStageConfig) and stage.consumes_labels())
    phases = Phases(generate=generate, score=score, reward=reward_s(dev, rows, dp) if graded else 0.0,
                    train=train_s(dev, tarch.num_params, tokens, trainers, tm),
                    sync=sync_s(plan, stage, archs, dev, n) if generate else 0.0)
    rest = phases.score + phases.reward + phases.train + phases.sync
    k = stage.rollout.max_staleness if separate else 0
    if k >= 1:
        step, once = max(phases.generate, rest), once + phases.generate  # the first batch fills the pipeline
    else:
        step = phases.generate + rest
    evaluation = 0.0
    if stage.eval and train_mem.eval_sampler is not None:
        evaluation = evaluation_s(plan, dev, tarch, tm, trainers, train_mem.eval_sampler)
    roles = trainer_roles(stage, separate)
    return JobPrice(job=stage.name, device=dev.name, placement=placement if separate else "colocated", gpus=world,
                    generation_ranks=n, max_staleness=k, steps=stage.steps, phases=phases, step_s=step, once_s=once,
                    eval_s=evaluation, startup_s=dev.job_startup_s, train_layout=_train_layout(plan, roles, trainers),
                    gen_layout=_gen_layout(plan, stage, n if separate else world) if stage.generates() else "-",
                    fits=train_mem.fits and gen_mem.fits)


def price_base_eval(plan: PlanConfig, archs: dict[str, ArchSpec], dev: DeviceProfile | None = None) -> JobPrice:
    """``base_eval``: each base model evaluated in turn on every GPU (``max_batch_tokens: auto``, as the job runs it:
    the memory left next to its weights)."""
    dev = dev or device_for(plan)
    world, total = _world(plan), 0.0
    mml = max_model_len(plan, plan.eval.max_new_tokens)
    for role in ("teacher", "student"):  # the sampler as models.memory.estimate_base_eval_memory sizes it
        m, arch = plan.models[role], archs[role]
        p = params_on_heaviest_stage(arch, m.tp, m.pp)
        resident = p * (dtype_bytes(m.dtype) + (FP8_CACHE_BYTES if m.fp8 else 0)) / GIB + CUDA_CONTEXT_NCCL_GIB
        smp = sampler_memory(arch, m, mml, "auto", plan.launch.gpu_memory_gib - resident)
        total += evaluation_s(plan, dev, arch, m, world, smp)
    fits = estimate_base_eval_memory(plan, archs).fits
    return JobPrice(job="base_eval", device=dev.name, placement="-", gpus=world, generation_ranks=0, max_staleness=0,
                    steps=0, phases=Phases(), step_s=0.0, once_s=0.0, eval_s=total, startup_s=dev.job_startup_s,
                    train_layout=_train_layout(plan, ["teacher", "student"], world), gen_layout="-", fits=fits)


# ------------------------------------------------------------------------------------------------- placement
def separate_candidates(plan: PlanConfig, stage: StageBase) -> list[int]:
    """Generation-rank counts N a separate ``stage`` can take: multiples of one engine replica (tp_g x pp_g) below
    the world whose T = world - N trainers hold whole replicas of every model they run and split the step's
    prompts evenly over the trained model's data-parallel ranks, each with a row for every update (none for a
    stage kind generation ranks do not serve, ``config.validate.can_separate``)."""
    if not can_separate(stage):
        return []
    world = _world(plan)
    tp_g, pp_g = generation_layout(plan, stage)
    trained = plan.models[stage.trains]
    on_trainers = [plan.models[r] for r in trainer_roles(stage, True)]
    out = []
    for n in range(tp_g * pp_g, world, tp_g * pp_g):
        t = world - n
        if any(t % (m.tp * m.pp) for m in on_trainers):
            continue
        dp = t // (trained.tp * trained.pp)
        rows_per_rank = stage.prompts_per_step // dp * stage.rows_per_prompt()
        if stage.prompts_per_step % dp or rows_per_rank < stage.updates_per_step:
            continue
        out.append(n)
    return out


def best_separate(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
                  dev: DeviceProfile | None = None) -> JobPrice | None:
    """The separate option of least wall time over :func:`separate_candidates` (ties: fewest generation ranks),
    among those whose memory fits when any does; None when no N is possible."""
    prices = [price_stage(plan, stage, archs, "separate", n, dev) for n in separate_candidates(plan, stage)]
    fitting = [p for p in prices if p.fits] or prices
    return min(fitting, key=lambda p: (p.wall_s, p.generation_ranks), default=None)


def _choice(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], dev: DeviceProfile | None
            ) -> tuple[str, int, JobPrice, JobPrice | None]:
    colocated = price_stage(plan, stage, archs, "colocated", 0, dev)
    sep = best_separate(plan, stage, archs, dev)
    ahead = stage.rollout.max_staleness > 0  # generation ahead of training runs on ranks of its own only
    if sep is not None and (ahead or sep.fits and (not colocated.fits or sep.gpu_hours < colocated.gpu_hours)):
        return "separate", sep.generation_ranks, colocated, sep
    return "colocated", 0, colocated, sep


def choose_placement(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
                     dev: DeviceProfile | None = None) -> tuple[str, int]:
    """``rollout.placement: auto``: ("separate", N) when the best separate option (:func:`best_separate`) fits and
    costs fewer GPU-hours than colocated (or colocated does not fit), else ("colocated", 0). With
    ``max_staleness`` > 0 (generation ahead of training: separate ranks only) auto chooses N alone. ``archs``: both
    models' ArchSpec (``launch.checks.resolve_arch``)."""
    if not stage.generates():
        return "colocated", 0
    return _choice(plan, stage, archs, dev)[:2]


def resolve_placements(plan: PlanConfig, archs: dict[str, ArchSpec], dev: DeviceProfile | None = None
                       ) -> tuple[PlanConfig, list[str]]:
    """The plan with every ``rollout.placement: auto`` of a stage that generates replaced by the choice of
    :func:`choose_placement` (``placement`` and ``generation_ranks`` set), validated again (a stage with
    ``max_staleness`` > 0 and no possible split is refused, naming the field), and one line per choice saying why.
    The launcher resolves before the run folder's ``plan.resolved.yaml`` is written, so every job reads the choice."""
    stages, notes = [], []
    for s in plan.stages:
        if not s.generates() or s.rollout.placement != "auto":
            stages.append(s)
            continue
        where, n, colocated, sep = _choice(plan, s, archs, dev)
        stages.append(replace(s, rollout=replace(s.rollout, placement=where, generation_ranks=n)))
        other = (f"separate on {sep.generation_ranks} of {_world(plan)} ranks {_h(sep.gpu_hours)} GPU-h"
                 f"{'' if sep.fits else ' (does not fit)'}" if sep is not None else "no separate split possible")
        chosen = f"separate, {n} generation ranks" if where == "separate" else "colocated"
        notes.append(f"stages.{s.name}.rollout.placement: auto -> {chosen} (priced: colocated "
                     f"{_h(colocated.gpu_hours)} GPU-h{'' if colocated.fits else ' (does not fit)'}, {other})")
    if not notes:
        return plan, []
    out = replace(plan, stages=stages)
    validate_plan(out, where="plan (rollout.placement: auto resolved)")
    return out, notes


def placement_of(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec]) -> tuple[str, int]:
    """The placement a stage's job runs at: the plan's, ``auto`` resolved by :func:`choose_placement`; a stage
    that does not generate is colocated."""
    r = stage.rollout
    if not stage.generates() or r.placement == "colocated":
        return "colocated", 0
    if r.placement == "auto":
        return choose_placement(plan, stage, archs)
    return "separate", r.generation_ranks


def price_job(plan: PlanConfig, job_name: str, archs: dict[str, ArchSpec], placement: tuple[str, int] | None = None,
              dev: DeviceProfile | None = None) -> JobPrice:
    """The price of job ``job_name`` (a stage or ``base_eval``) at ``placement`` (default :func:`placement_of`),
    with the other placement's for a stage that generates (separate: :func:`best_separate`)."""
    if job_name == "base_eval":
        return price_base_eval(plan, archs, dev)
    stage = next(s for s in plan.stages if s.name == job_name)
    where, n = placement or placement_of(plan, stage, archs)
    price = price_stage(plan, stage, archs, where, n, dev)
    if not stage.generates():
        return price
    other = price_stage(plan, stage, archs, "colocated", 0, dev) if where == "separate" else \
        best_separate(plan, stage, archs, dev)
    return replace(price, other=other)


# ------------------------------------------------------------------------------------------------- the table
def _h(hours: float) -> str:
    return f"{hours:.1f}" if hours >= 10 else f"{hours:.2f}" if hours >= 0.1 else f"{hours:.3f}"


def _other(p: JobPrice) -> str:
    o = p.other
    if o is None:
        return "-"
    where = f"sep N={o.generation_ranks}" if o.placement == "separate" else "coloc"
    return f"{where}: {_h(o.gpu_hours)}{'' if o.fits else '!'}"


def format_prices(prices: list[JobPrice]) -> str:
    """The price table: one row per job (a separate job: one per side, its GPU-hours split by GPUs), the plan's
    total GPU-hours on the last line."""
    head = ("job", "side", "placement", "gpus", "layout", "step: gen+score+reward+train+sync s", "step_s", "stage_h",
            "gpu_h", "other placement gpu_h")
    rows = [head]
    for p in prices:
        flag = "" if p.fits else "!"
        step = p.phases.describe(p.pipelined) if p.steps else "-"
        where = p.placement + (f" k={p.max_staleness}" if p.placement == "separate" else "")
        side_gpus = p.train_gpus if p.placement == "separate" else p.gpus
        layout = p.train_layout if p.placement == "separate" or p.gen_layout == "-" else \
            f"{p.train_layout}; {p.gen_layout}"
        rows.append((p.job, "train" if p.placement == "separate" else "all", where, str(side_gpus), layout, step,
                     f"{p.step_s:.1f}" if p.steps else "-", _h(p.wall_s / 3600),
                     f"{_h(side_gpus * p.wall_s / 3600)}{flag}", _other(p)))
        if p.placement == "separate":
            rows.append((p.job, "gen", where, str(p.generation_ranks), p.gen_layout, "-", "-", _h(p.wall_s / 3600),
                         f"{_h(p.generation_ranks * p.wall_s / 3600)}{flag}", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    device = prices[0].device if prices else "-"
    total = sum(p.gpu_hours for p in prices)
    flagged = [p.job for p in prices if not p.fits]
    notes = [
        f"(price: launch/pricing.py's analytic model on device {device} (launch/price_constants.py); mean prompt "
        f"{C.PROMPT_FRACTION:g} x data.max_prompt_tokens, mean response {C.RESPONSE_FRACTION:g} x max_new_tokens)",
        "(step = generate + score + reward + train + sync; separate with max_staleness k >= 1: max(generate, the "
        "rest); stage_h = start-up + steps + one-off phases + final evaluation; gpu_h = GPUs x stage_h)",
        "(other placement: separate at its least-time generation_ranks N and the stage's max_staleness, or "
        "colocated; ! = does not fit its GPUs"
        + (f": {', '.join(flagged)}" if flagged else "") + ")",
    ]
    return "\n".join(lines + notes + [f"total: {_h(total)} GPU-hours ({len(prices)} jobs)"])
