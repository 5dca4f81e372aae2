"""Everything the launcher does before the first stage job starts (single process, no torch.distributed):

0. check the inputs before anything heavy (``check_inputs``): prompt + response budgets against each model's context,
   data sources that exist and parse;
1. resolve the plan (overrides applied) and write ``plan.resolved.yaml`` — every job reads that file;
2. build the embedded toy world when the plan asks for it (tiny base models + tokenizer, cached);
3. import each base model Megatron-natively once (``checkpoint.hf_to_megatron``; skipped when already there);
4. refuse a teacher/student tokenizer mismatch and TP/PP layouts that do not divide the models;
5. split the labeled pool and write the manifests.
Bad input fails here, with a message naming the field or file, before any job is launched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megatron_s2d.config import PlanConfig, to_dict
from megatron_s2d.config.schema import ModelConfig
from megatron_s2d.config.validate import context_errors
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec, check_layout, load_arch
from megatron_s2d.data.sources import data_source_errors, load_source, solution_errors
from megatron_s2d.data.split_store import write_splits
from megatron_s2d.data.splits import split_fractions
from megatron_s2d.checkpoint.assets import check_same_tokenizer
from megatron_s2d.stages.layout import RunLayout


def write_resolved_plan(plan: PlanConfig, layout: RunLayout, path: Path | None = None) -> Path:
    """Write the resolved plan (atomically) to ``path`` (default: the run's ``plan.resolved.yaml``, which every job
    reads: only a launcher holding the run lock, after every check passed, writes that one)."""
    path = Path(path) if path is not None else layout.plan
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(plan)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def _import_base(plan: PlanConfig, role: str, layout: RunLayout, log) -> None:
    from megatron_s2d.checkpoint.hf_to_megatron import convert_hf_to_megatron

    m = plan.models[role]
    dest = layout.base_model(role)
    if (dest / "s2d_model.json").is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if m.megatron:
        if not (Path(m.megatron) / "s2d_model.json").is_file():
            raise S2DError(f"models.{role}.megatron = {m.megatron}: not a megatron-s2d model checkpoint")
        dest.symlink_to(Path(m.megatron).resolve(), target_is_directory=True)
        return
    log(f"importing {role} base weights {m.hf} -> {dest} (megatron dist checkpoint)")
    convert_hf_to_megatron(m.hf, dest, tp=m.tp, pp=m.pp, dtype=m.dtype)


def resolve_plan(plan: PlanConfig, log=print, build_toy: bool = True) -> PlanConfig:
    """The plan as every job reads it: run_dir absolute, the toy world's model folders filled in (built if needed),
    model architectures and layouts checked. Writes nothing into the run folder but a toy world it builds."""
    layout = RunLayout.of(plan.run_dir)
    plan = dataclasses.replace(plan, run_dir=str(layout.root))
    check_inputs(plan)  # before a toy world is built or anything imported
    if plan.toy_world and build_toy:
        from megatron_s2d.toy.build import world_for

        world = world_for(plan.toy_world_seed, layout.toy_world, log=log)
        models = dict(plan.models)
        models["teacher"] = dataclasses.replace(models["teacher"], hf=str(world.teacher_dir))
        models["student"] = dataclasses.replace(models["student"], hf=str(world.student_dir))
        plan = dataclasses.replace(plan, models=models)
    check_models(plan)
    return plan


def prepare_run(plan: PlanConfig, log=print, build_toy: bool = True, check=None,
                restart: tuple[str, ...] = ()) -> tuple[PlanConfig, RunLayout]:
    """Resolve + check the plan and prepare the run folder; returns the resolved plan and its layout.

    Nothing of the run folder's state changes before every check passed: the plan is resolved, ``check(plan)`` (the
    launcher's checks: layouts, memory, jobs) runs, the stages' folders must agree with the plan (config drift:
    ``stages.provenance``), and only then is ``plan.resolved.yaml`` written (the caller holds the run lock), the base
    models imported and the pool split. ``restart``: stages to redo; once the checks passed, their folders (and their
    descendants') are set aside (``stages.provenance.set_aside``), never deleted."""
    from megatron_s2d.stages.provenance import check_plan_drift, set_aside

    plan = resolve_plan(plan, log, build_toy)
    layout = RunLayout.of(plan.run_dir)
    if check is not None:
        check(plan)
    for name in restart:
        set_aside(plan, layout, name, log=log)
    for note in check_plan_drift(plan, layout):
        log(note)
    write_resolved_plan(plan, layout)
    for role in ("teacher", "student"):
        _import_base(plan, role, layout, log)
    check_same_tokenizer(layout.base_model("teacher") / "tokenizer", layout.base_model("student") / "tokenizer")
    manifests = prepare_splits(plan, layout, log)
    log("splits: " + ", ".join(f"{k}={v['count']} ({v['content_hash'][:8]})" for k, v in manifests.items()))
    return plan, layout


def prepare_splits(plan: PlanConfig, layout: RunLayout, log=print) -> dict[str, dict]:
    """Load the pool, split it by content hash, write members + manifests (idempotent)."""
    problems = load_source(plan.data.pool, plan.data.pool_limit, log=log)
    fractions = dict(plan.data.split.fractions)
    rest = 1.0 - sum(fractions.values())
    if rest > 1e-9:
        fractions["_unused"] = rest
    return write_splits(layout.data, split_fractions(problems, fractions, seed=plan.data.split.seed))


def check_inputs(plan: PlanConfig) -> None:
    """What the plan's files must hold, checked before anything heavy (a toy world built, a base model imported, a
    job started): each prompt + response budget fits every model that generates or scores it
    (``config.validate.context_errors``), and every data source exists and parses (``data.sources.check_source``).
    The dry run makes the same checks (``launch.checks.check_jobs``)."""
    errors = context_errors(plan, model_contexts(plan)) + data_source_errors(plan.data)
    errors += solution_errors(plan.data.pool, [s.name for s in plan.stages if s.reads_solutions()])
    if errors:
        raise S2DError(f"plan {plan.name!r}: " + "; ".join(errors))


def model_contexts(plan: PlanConfig) -> dict[str, int]:
    """Each model's context (``max_position_embeddings``) from its config alone: the toy world's (the same for every
    toy seed: ``toy.models``), or the model's own (:func:`model_arch`)."""
    if plan.toy_world:
        from megatron_s2d.toy.models import MAX_POSITION_EMBEDDINGS

        return {role: MAX_POSITION_EMBEDDINGS for role in plan.models}
    return {role: model_arch(m, f"models.{role}").max_position_embeddings for role, m in plan.models.items()}


def model_arch(m: ModelConfig, where: str) -> ArchSpec:
    """A model's architecture from its config alone (no weights): a megatron-s2d checkpoint's ``s2d_model.json``, else
    the HF folder's ``config.json``."""
    if m.megatron and (Path(m.megatron) / "s2d_model.json").is_file():
        from megatron_s2d.checkpoint.model_ckpt import read_model_meta

        return read_model_meta(m.megatron)[0]
    try:
        return load_arch(m.hf or m.megatron)
    except S2DError as e:
        raise S2DError(f"{where}: {e}") from None


def check_models(plan: PlanConfig) -> None:
    """Architecture support and TP/PP divisibility, from each model's config.json (no weights needed)."""
    for role, m in plan.models.items():
        if m.hf or m.megatron:
            check_layout(model_arch(m, f"models.{role}"), m.tp, m.pp, where=f"models.{role}")
    if plan.models["teacher"].hf and plan.models["student"].hf:
        t, s = Path(plan.models["teacher"].hf), Path(plan.models["student"].hf)
        if (t / "tokenizer.json").is_file() and (s / "tokenizer.json").is_file():
            check_same_tokenizer(t, s)
