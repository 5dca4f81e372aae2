"""Everything the launcher does before the first stage job starts (single process, no torch.distributed):

1. resolve the plan (overrides applied) and write ``plan.resolved.yaml`` — every job reads that file;
2. build the embedded toy world when the plan asks for it (tiny base models + tokenizer, cached);
3. import each base model Megatron-natively once (``checkpoint.hf_to_megatron``; skipped when already there);
4. refuse a teacher/student tokenizer mismatch and TP/PP layouts that do not divide the models;
5. split the labeled pool and write the manifests.
Bad input fails here, with a message naming the field or file, before any job is launched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from megatron_s2d.config import PlanConfig, to_dict
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import check_layout, load_arch
from megatron_s2d.data.sources import load_source
from megatron_s2d.data.split_store import write_splits
from megatron_s2d.data.splits import split_fractions
from megatron_s2d.checkpoint.assets import check_same_tokenizer
from megatron_s2d.stages.layout import RunLayout


def write_resolved_plan(plan: PlanConfig, layout: RunLayout) -> Path:
    layout.root.mkdir(parents=True, exist_ok=True)
    data = to_dict(plan)
    tmp = layout.plan.with_name(layout.plan.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(layout.plan)
    return layout.plan


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


def prepare_run(plan: PlanConfig, log=print, build_toy: bool = True) -> tuple[PlanConfig, RunLayout]:
    """Resolve + check the plan and prepare the run folder; returns the resolved plan and its layout."""
    layout = RunLayout.of(plan.run_dir)
    plan = dataclasses.replace(plan, run_dir=str(layout.root))
    if plan.toy_world and build_toy:
        from megatron_s2d.toy.build import world_for

        world = world_for(plan.toy_world_seed, layout.toy_world, log=log)
        models = dict(plan.models)
        models["teacher"] = dataclasses.replace(models["teacher"], hf=str(world.teacher_dir))
        models["student"] = dataclasses.replace(models["student"], hf=str(world.student_dir))
        plan = dataclasses.replace(plan, models=models)
    check_models(plan)
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


def check_models(plan: PlanConfig) -> None:
    """Architecture support and TP/PP divisibility, from each model's config.json (no weights needed)."""
    for role, m in plan.models.items():
        src = m.hf or m.megatron
        if src is None:
            continue
        if m.megatron and (Path(m.megatron) / "s2d_model.json").is_file():
            from megatron_s2d.checkpoint.model_ckpt import read_model_meta

            arch = read_model_meta(m.megatron)[0]
        else:
            arch = load_arch(src)
        check_layout(arch, m.tp, m.pp, where=f"models.{role}")
    if plan.models["teacher"].hf and plan.models["student"].hf:
        t, s = Path(plan.models["teacher"].hf), Path(plan.models["student"].hf)
        if (t / "tokenizer.json").is_file() and (s / "tokenizer.json").is_file():
            check_same_tokenizer(t, s)


def summary(layout: RunLayout) -> dict:
    return json.loads(layout.splits_manifest.read_text()) if layout.splits_manifest.is_file() else {}
