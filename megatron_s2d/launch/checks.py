"""Pure launch checks: every job's parallel layout and memory, from config files only (no cluster, no weights, no
process group), and the per-job table the dry run prints. The plan loader already checked everything that needs no
model config (DAG, ranges, world size, the data-parallel split of prompts: ``config.validate``); this adds what needs
the models' shapes.

For each job (all stages share the plan's allocation: ``launch.nodes`` x ``launch.procs_per_node`` GPUs):
  * world = nodes x GPUs per node; for every model the job runs (the trained policy; the teacher of
    ``fkl_warmup`` / ``opd``; both models for ``base_eval``) ``tp * pp`` divides the world (DP >= 1, integer) and
    :func:`megatron_s2d.models.arch.check_layout` accepts the layout (heads, query groups, vocab, ffn by TP; layers
    by PP);
  * the prompts of a step divide over the trained model's DP ranks and every rank has rows for every update
    (``config.validate.batch_layout_errors``, the same check the plan loader runs);
  * the per-GPU memory estimate of :mod:`megatron_s2d.models.memory` fits ``launch.gpu_memory_gib`` in both phases
    (``train_peak``, ``gen_peak``), and a set ``rollout.vllm.gpu_memory_utilization`` fits next to the trainer.
A separate stage (``rollout.placement: separate``; ``auto`` resolved by ``launch.pricing.choose_placement``) is
checked per side: its trainers (the world less ``rollout.generation_ranks``: their models, DP and memory) and its
generation ranks (the engine's layout and memory: ``models.memory.estimate_separate_memory``); the table shows both.
Every job is priced (``launch.pricing``: step time, stage hours, GPU-hours, the other placement's), and the table
ends with the price table and the plan's total GPU-hours.
All problems are collected and raised together (one :class:`S2DError` naming stage, field and numbers); when only
memory does not fit, the error (:class:`MemoryBudgetError`) carries the checks, so the dry run prints the tables,
over-budget peaks and prices flagged, before it fails.

Model sizes come from the model's HF ``config.json``: ``models.<role>.hf`` when that folder has one; otherwise
the package's ``models/hf_configs/<basename(hf)>/config.json`` (shipped copies of the real Qwen3 / Llama configs, so
an installed ``s2d`` dry-runs the recipes anywhere, without the weights); for ``models.<role>.megatron`` the ``s2d_model.json`` of that checkpoint;
for toy plans the toy world's shapes (the shipped world's, or a built ``<run_dir>/toy_world/<role>/config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_s2d.config.schema import PlanConfig
from megatron_s2d.config.validate import context_errors, layout_errors, vllm_tp
from megatron_s2d.data.sources import data_source_errors, solution_errors
from megatron_s2d.errors import S2DError, read_json
from megatron_s2d.launch.jobs import Job
from megatron_s2d.launch.pricing import JobPrice, format_prices, placement_of, price_job, trainer_roles
from megatron_s2d.models.memory import (
    StageMemory, estimate_base_eval_memory, estimate_separate_memory, estimate_stage_memory, generation_layout,
)
from megatron_s2d.models.arch import ArchSpec, arch_from_hf_config, check_layout, load_arch
from megatron_s2d.stages.layout import RunLayout

HF_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "models" / "hf_configs"  # package data
MEGATRON_META = "s2d_model.json"  # written by megatron_s2d.checkpoint.model_ckpt (read here without importing torch)


# The toy tokenizer's vocabulary cap (a multiple of 16); used only before the toy world is built.
TOY_VOCAB = 384


def _toy_arch(role: str) -> ArchSpec:
    from megatron_s2d.toy.models import MAX_POSITION_EMBEDDINGS, STUDENT_SPEC, TEACHER_SPEC

    spec = TEACHER_SPEC if role == "teacher" else STUDENT_SPEC
    cfg = {"model_type": "qwen3", "vocab_size": TOY_VOCAB, "hidden_size": spec.hidden_size,
           "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
           "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
           "tie_word_embeddings": spec.tie_word_embeddings, "max_position_embeddings": MAX_POSITION_EMBEDDINGS}
    return arch_from_hf_config(cfg, where=f"toy {role}")


def resolve_arch(plan: PlanConfig, role: str) -> tuple[ArchSpec, str]:
    """(architecture, where it was read from) of ``models.<role>``; see the module docstring for the search order."""
    m = plan.models[role]
    if m.hf:
        hf = Path(m.hf).expanduser()
        if (hf / "config.json").is_file():
            return load_arch(hf), str(hf / "config.json")
        shipped = HF_CONFIGS_DIR / hf.name
        if (shipped / "config.json").is_file():
            return load_arch(shipped), str(shipped / "config.json")
        raise S2DError(f"models.{role}.hf = {m.hf!r}: no config.json there, and no shipped copy at "
                       f"{shipped / 'config.json'}")
    if m.megatron:
        meta = Path(m.megatron).expanduser() / MEGATRON_META
        if not meta.is_file():
            raise S2DError(f"models.{role}.megatron = {m.megatron!r}: {meta} not found (not a megatron-s2d model "
                           f"checkpoint)")
        return ArchSpec.from_json(read_json(meta)["arch"]), str(meta)
    from megatron_s2d.toy.build import shipped_world

    world, _ = shipped_world(plan.toy_world_seed)
    built = (world.root if world else RunLayout.of(plan.run_dir).toy_world) / role / "config.json"
    if built.is_file():
        return load_arch(built.parent), str(built)
    return _toy_arch(role), "toy world (megatron_s2d.toy.models)"


@dataclass(frozen=True)
class JobCheck:
    """The validated layout and memory of one job (``report`` jobs are not checked: no GPU)."""

    job: Job
    nodes: int
    gpus_per_node: int
    layouts: dict[str, tuple[int, int, int]]  # role -> (tp, pp, dp) of each model the job runs
    params: dict[str, int]  # role -> parameter count
    memory: StageMemory
    generation: str = "-"  # how the job's rollouts are generated, e.g. "vllm t:tp8x2" (role, vLLM tp x replicas)
    placement: str = "colocated"  # "separate": the last ``generation_ranks`` ranks generate, the others train
    generation_ranks: int = 0
    generation_memory: StageMemory | None = None  # separate: one generation rank's memory (``memory``: a trainer's)
    generation_model: tuple[str, int, int, int, int] | None = None  # separate: (role, tp, pp, replicas, params)
    price: JobPrice | None = None  # the job's estimated step time, wall time and GPU-hours (launch.pricing)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def trainers(self) -> int:
        return self.world - self.generation_ranks


class MemoryBudgetError(S2DError):
    """Every layout is valid but some job does not fit its GPUs; ``checks`` holds every job's check for the table."""

    def __init__(self, message: str, checks: list["JobCheck"]):
        super().__init__(message)
        self.checks = checks


def check_job(plan: PlanConfig, job: Job, archs: dict[str, ArchSpec], errors: list[str],
              memory_errors: list[str] | None = None) -> JobCheck | None:
    """Validate one job, appending problems to ``errors`` (memory ones to ``memory_errors``, default ``errors``);
    returns its check (None for the report job)."""
    if job.kind == "report":
        return None
    nodes, gpn = plan.launch.nodes, plan.launch.procs_per_node
    world = nodes * gpn
    stage = None if job.kind == "base_eval" else next(s for s in plan.stages if s.name == job.name)
    placement, n_gen = ("colocated", 0) if stage is None else placement_of(plan, stage, archs)
    separate = placement == "separate"
    trainers = world - n_gen
    if separate:  # generation ranks that do not exist or hold no whole replica: config.validate.placement_errors
        tp_g, pp_g = generation_layout(plan, stage)
        if not 0 < n_gen < world or n_gen % (tp_g * pp_g):
            return None
        try:
            check_layout(archs[stage.samples_from], tp_g, pp_g,
                         where=f"{job.name}: the generation ranks' models.{stage.samples_from} (tp={tp_g}, pp={pp_g})")
        except S2DError as e:
            errors.append(str(e))
    roles = ["teacher", "student"] if stage is None else trainer_roles(stage, separate)
    layouts, params, n_errors = {}, {}, len(errors)
    for role in roles:
        m, arch = plan.models[role], archs[role]
        where = f"{job.name}: models.{role} (tp={m.tp}, pp={m.pp})"
        if trainers % (m.tp * m.pp):
            continue  # reported once by config.validate.layout_errors (check_jobs)
        try:
            check_layout(arch, m.tp, m.pp, where=where)
        except S2DError as e:
            errors.append(str(e))
            continue
        layouts[role] = (m.tp, m.pp, trainers // (m.tp * m.pp))
        params[role] = arch.num_params
    if len(errors) > n_errors or len(layouts) < len(roles):
        return None
    gen_memory = None
    if stage is None:
        memory = estimate_base_eval_memory(plan, archs)
    elif separate:
        memory, gen_memory = estimate_separate_memory(plan, stage, archs, n_gen)
    else:
        memory = estimate_stage_memory(plan, stage, archs)
    (errors if memory_errors is None else memory_errors).extend(
        memory.problems + (gen_memory.problems if gen_memory is not None else ()))
    price = price_job(plan, job.name, archs, (placement, n_gen))
    generation, gen_model = "-", None
    if stage is not None and separate:
        tp_g, pp_g = generation_layout(plan, stage)
        engine = "sampler" if stage.rollout.engine == "megatron" else "vllm"
        v = gen_memory.vllm
        util = f" u={v.util:.2f}{'' if v.derived else ' set'}" if v is not None else ""
        generation = f"{engine} {stage.samples_from[0]}:{tp_g}/{pp_g}x{n_gen // (tp_g * pp_g)}{util}"
        gen_model = (stage.samples_from, tp_g, pp_g, n_gen // (tp_g * pp_g), archs[stage.samples_from].num_params)
    elif stage is not None:
        role = stage.samples_from
        if stage.rollout.engine == "megatron":
            generation = f"sampler {role[0]}"
        else:
            vtp = vllm_tp(plan, stage)
            try:
                check_layout(archs[role], vtp, 1, where=f"{job.name}: rollout.vllm (tp={vtp}) of models.{role}")
            except S2DError as e:
                errors.append(str(e))
            engine = "vllm" if stage.rollout.engine == "vllm" else "auto(vllm)"
            v = memory.vllm
            generation = f"{engine} {role[0]}:tp{vtp}x{world // vtp} u={v.util:.2f}{'' if v.derived else ' set'}"
    return JobCheck(job, nodes, gpn, layouts, params, memory, generation, placement, n_gen, gen_memory, gen_model,
                    price)


def resolve_placements(plan: PlanConfig, log=print) -> PlanConfig:
    """``rollout.placement: auto`` resolved by the price model (``launch.pricing.resolve_placements``) from the
    models' configs, each choice logged; the plan unchanged when no stage that generates says ``auto``."""
    from megatron_s2d.launch.pricing import resolve_placements as resolve

    if not any(s.generates() and s.rollout.placement == "auto" for s in plan.stages):
        return plan
    plan, notes = resolve(plan, {role: resolve_arch(plan, role)[0] for role in ("teacher", "student")})
    for note in notes:
        log(note)
    return plan


def check_jobs(plan: PlanConfig, jobs: list[Job]) -> list[JobCheck]:
    """Validate all jobs; raise one S2DError listing every problem."""
    errors: list[str] = []
    archs: dict[str, ArchSpec] = {}
    for role in ("teacher", "student"):
        try:
            archs[role] = resolve_arch(plan, role)[0]
        except S2DError as e:
            errors.append(str(e))
    if errors:
        raise S2DError("dry run: cannot read the model configs:\n  - " + "\n  - ".join(errors))
    errors.extend(layout_errors(plan))  # divisibility: the plan loader's check, again on the plan as given here
    # what a run checks before anything heavy (run.preflight.check_inputs), from the configs read here
    errors.extend(context_errors(plan, {role: arch.max_position_embeddings for role, arch in archs.items()}))
    errors.extend(data_source_errors(plan.data))
    errors.extend(solution_errors(plan.data.pool, [s.name for s in plan.stages if s.reads_solutions()]))
    memory_errors: list[str] = []
    checks = [c for c in (check_job(plan, j, archs, errors, memory_errors) for j in jobs) if c is not None]
    if errors or memory_errors:
        problems = errors + memory_errors
        message = f"dry run of plan {plan.name!r} found {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
        if errors:
            raise S2DError(message)
        raise MemoryBudgetError(message, checks)
    return checks


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _peaks(m: StageMemory) -> tuple[str, str]:
    """``train_peak`` and ``gen_peak`` cells; "!" marks a phase that does not fit (vLLM: also a share too small for
    one sequence)."""
    train = f"{m.train_peak_gib:.1f}" + ("!" if m.train_problems else "") if m.trains else "-"
    return train, f"{m.gen_peak_gib:.1f}" + ("!" if m.gen_problems else "")


def _memory_cells(m: StageMemory, generation_side: bool = False) -> tuple[str, ...]:
    """weights, teacher, fp8, grads+optim, act, engine, train_peak, gen_peak, budget."""
    trains = ("-", "-") if generation_side else (f"{m.grads_gib + m.optim_gib:.1f}", f"{m.activations_gib:.1f}")
    return (f"{m.weights_gib:.1f}", f"{m.frozen_gib:.1f}", f"{m.fp8_gib:.1f}", *trains,
            f"{m.gen_peak_gib - m.resident_gib:.1f}", *_peaks(m), f"{m.budget_gib:g}")


def format_table(checks: list[JobCheck], scripts: dict[str, str]) -> str:
    """One row per job (a separate stage: one per side, ``[train]`` and ``[gen]``): nodes, GPUs, TP/PP/DP per model,
    parameters, memory terms and phase peaks (GiB), script; then the price table (``launch.pricing``), whose last
    line is the plan's total GPU-hours."""
    head = ("job", "nodes", "gpus", "tp/pp/dp", "params", "generation", "weights", "teacher", "fp8", "grads+optim",
            "act", "engine", "train_peak", "gen_peak", "budget", "script")
    rows = [head]
    for c in checks:
        lay = " ".join(f"{r[0]}:{t}/{p}/{d}" for r, (t, p, d) in c.layouts.items())
        par = " ".join(f"{r[0]}:{_count(n)}" for r, n in c.params.items())
        name = c.job.name + (" (complete)" if c.job.complete else "")
        script = scripts.get(c.job.name, "")
        if c.generation_memory is None:
            rows.append((name, str(c.nodes), str(c.world), lay, par, c.generation, *_memory_cells(c.memory), script))
            continue
        gpn, n = c.gpus_per_node, c.generation_ranks
        rows.append((f"{name} [train]", str(-(-c.trainers // gpn)), str(c.trainers), lay, par,
                     f"on {n} generation ranks", *_memory_cells(c.memory), script))
        role, tp_g, pp_g, replicas, gen_params = c.generation_model
        rows.append((f"{name} [gen]", str(-(-n // gpn)), str(n), f"{role[0]}:{tp_g}/{pp_g}/{replicas}",
                     f"{role[0]}:{_count(gen_params)}", c.generation, *_memory_cells(c.generation_memory, True),
                     script))
    for name, path in scripts.items():
        if name not in {c.job.name for c in checks}:
            rows.append((name, "1", "0", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    overhead = next((c.memory.overhead_gib for c in checks), 0.0)
    separate = ["(separate: [train] = one trainer GPU (no rollout engine: its engine column is the final evaluation's "
                "sampler), [gen] = one generation GPU (the engine alone); generation: engine, model tp/pp x replicas)"
                ] if any(c.generation_memory is not None for c in checks) else []
    prices = [c.price for c in checks if c.price is not None]
    return "\n".join(lines + separate + [
        "(memory in GiB per GPU; tp/pp/dp per model: t = teacher, s = student; generation: engine, generating model, "
        "vLLM tp x replicas, colocated on the job's GPUs)",
        "(u = vLLM's gpu_memory_utilization, derived from this estimate unless marked set; engine = vLLM's share "
        "u x budget, or the megatron sampler's KV cache + working memory)",
        f"(train_peak = weights + teacher + fp8 + grads+optim + act; gen_peak = weights + teacher + fp8 + engine, "
        f"grads and optimizer on the host (the final evaluation counts them); both + {overhead:g} CUDA context/NCCL; "
        "! = does not fit; formulas: megatron_s2d/models/memory.py)"] + (["", format_prices(prices)] if prices else []))
