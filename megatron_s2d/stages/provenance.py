"""What a stage's folder was made with, compared with what the plan says now (config drift), and ``--restart``.

    recorded = recorded_config(layout, "opd")          # from lineage.json (complete) or the latest checkpoint
    neutral = check_drift(plan, stage, recorded)       # S2DError naming each changed field, old -> new
    check_plan_drift(plan, layout)                     # every stage of the plan that has a folder: the launcher's check
    set_aside(plan, layout, "opd")                     # RUN/set_aside/<time>/opd (+ its descendants), never deleted

A stage records :func:`megatron_s2d.config.fingerprint.stage_fingerprint` in every training checkpoint it saves and
in its lineage. On a resume or a skip, a result-changing difference is refused; neutral differences (checkpoint
cadence, engine memory, layouts) are allowed, printed and appended to the stage's ``config_changes.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_s2d.config import PlanConfig, StageBase
from megatron_s2d.config.fingerprint import (
    describe_changes, fingerprint_digest, neutral_changes, result_changes, stage_fingerprint, unrecorded)
from megatron_s2d.config.validate import ancestors
from megatron_s2d.errors import S2DError, read_json
from megatron_s2d.stages.layout import RunLayout


@dataclass
class Recorded:
    fields: dict[str, Any] | None  # None: the folder predates fingerprints (nothing to compare)
    where: str  # the file it was read from
    complete: bool


def config_record(plan: PlanConfig, stage: StageBase) -> dict:
    """What a checkpoint / the lineage stores: the fields and the digest of the result-changing ones."""
    fields = stage_fingerprint(plan, stage)
    return {"digest": fingerprint_digest(fields), "fields": fields}


def _read_json(path: Path) -> dict:
    return read_json(path, fix="restore the file, or redo the stage with `s2d run PLAN --restart STAGE`")


def recorded_config(layout: RunLayout, name: str) -> Recorded | None:
    """The settings a stage's folder was made with: its lineage when complete, else its latest checkpoint's trainer
    state; None when the stage has neither (it starts fresh)."""
    lineage = layout.stage(name) / "lineage.json"
    if layout.is_complete(name) and lineage.is_file():
        rec = _read_json(lineage)
        return Recorded(rec.get("config_fields"), str(lineage), True)
    ptr = layout.checkpoints(name) / "latest"
    if ptr.is_file():
        state = layout.checkpoints(name) / ptr.read_text().strip() / "trainer_state.json"
        if state.is_file():
            rec = _read_json(state).get("config") or {}
            return Recorded(rec.get("fields"), str(state), False)
    return None


def check_drift(plan: PlanConfig, stage: StageBase, recorded: Recorded) -> list[tuple[str, Any, Any]]:
    """Raise naming every result-changing difference; return the neutral ones (allowed)."""
    if recorded.fields is None:
        return []
    now = stage_fingerprint(plan, stage)
    changed = [(plan_field(stage, k), a, b) for k, a, b in result_changes(recorded.fields, now)]
    if changed:
        what = "completed" if recorded.complete else "started"
        raise S2DError(
            f"stage {stage.name!r} was {what} with other settings than the plan now has ({recorded.where}): "
            f"{describe_changes(changed)}. Either revert these settings, or redo the stage with "
            f"`s2d run PLAN --restart {stage.name}` (its folder and those of the stages that depend on it are set "
            f"aside under RUN/set_aside/, not deleted)")
    missing = unrecorded(recorded.fields, now)
    notes = [(plan_field(stage, k), "<not recorded>", now[k]) for k in missing]  # an older record: not compared
    return [(plan_field(stage, k), a, b) for k, a, b in neutral_changes(recorded.fields, now)] + notes


def plan_field(stage: StageBase, name: str) -> str:
    """A fingerprint field as the plan (and a dotted override) addresses it."""
    plan_level = name in ("seed", "grader") or name.startswith(("models.", "data."))
    return name if plan_level else f"stages.{stage.name}.{name}"


def record_neutral_changes(layout: RunLayout, stage: StageBase, changes: list, step: int, log=print) -> None:
    if not changes:
        return
    log(f"settings changed since this stage's checkpoint (allowed: they do not change results): "
        f"{describe_changes(changes)}")
    with open(layout.stage(stage.name) / "config_changes.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "changes": [[k, a, b] for k, a, b in changes]}, default=str) + "\n")


def check_plan_drift(plan: PlanConfig, layout: RunLayout, skip: set[str] = frozenset()) -> list[str]:
    """The launcher's check: every stage of the plan with a folder it could resume or skip agrees with the plan
    (result-changing fields). Raises one S2DError naming every stage that does not; returns notes on neutral changes."""
    errors, notes = [], []
    for s in plan.stages:
        if s.name in skip:
            continue
        rec = recorded_config(layout, s.name)
        if rec is None:
            continue
        try:
            neutral = check_drift(plan, s, rec)
        except S2DError as e:
            errors.append(str(e))
            continue
        if neutral:
            notes.append(f"stage {s.name!r}: changed settings that do not change results: {describe_changes(neutral)}")
    if errors:
        raise S2DError("\n".join(errors))
    return notes


def descendants(plan: PlanConfig, name: str) -> list[str]:
    """The stages that depend on ``name`` (directly or through others), in plan order."""
    return [s.name for s in plan.stages if name in ancestors(plan, s.name)]


def set_aside(plan: PlanConfig, layout: RunLayout, name: str, log=print) -> list[Path]:
    """Move the stage's folder and its descendants' folders to ``RUN/set_aside/<UTC time>/`` (never deleted); the
    stages then start fresh. Refuses when one of them is running (its stage lock is held)."""
    from megatron_s2d.runtime.locks import hold_lock

    if name not in {s.name for s in plan.stages}:
        raise S2DError(f"--restart {name}: no such stage in the plan; stages: {[s.name for s in plan.stages]}")
    names = [name] + descendants(plan, name)
    present = [n for n in names if layout.stage(n).exists()]
    if not present:
        log(f"--restart {name}: nothing to set aside (no stage folder yet)")
        return []
    dest = layout.root / "set_aside" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while dest.exists():
        dest = dest.with_name(dest.name + "_")
    dest.mkdir(parents=True)
    moved = []
    for n in present:
        with hold_lock(layout.stage_lock(n), f"stage {n!r} of {layout.root}"):  # refuses while a job runs it
            target = dest / n
            os.rename(layout.stage(n), target)
        moved.append(target)
        log(f"--restart {name}: stage {n!r} set aside -> {target}")
    return moved
