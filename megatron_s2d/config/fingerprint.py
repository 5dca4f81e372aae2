"""A stage's config fingerprint: every setting its result depends on, as flat ``dotted.name -> value`` fields.

A stage records its fingerprint when it starts (in every training checkpoint) and when it completes (in
``lineage.json``). On every resume and every skip of a completed stage the plan's current fingerprint is compared
with the recorded one: a difference in a field that changes results is refused, naming each field, old -> new
(``stages.job`` / ``run.drift``). Settings that cannot change what the stage computes are *neutral*: they may change
between a stop and a resume, and the change is recorded.

    fields = stage_fingerprint(plan, stage)          # {"steps": 30, "optim.lr": 1e-6, "models.student.dtype": ...}
    changed = result_changes(recorded, fields)       # [("optim.lr", 1e-6, 0.5)]   (neutral fields left out)

What is in it: the stage's own config (minus the neutral fields), the plan seed, the plan's grader for a stage that
consumes labels (it is the reward), the data pool and split settings, the instruction, and, for each model the
stage holds (``StageBase.models``), its dtype and FP8 recipe (they change numerics). Parallel layouts (TP/PP),
recomputation, packing and engine memory settings are neutral: they move where the work happens, and the stage
resumes at any layout (dist checkpoints reshard).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from megatron_s2d.config.schema import PlanConfig, StageBase

# Stage fields (dotted, relative to the stage) that do not change what the stage computes. A prefix covers its subtree.
NEUTRAL_STAGE_FIELDS = (
    "name",  # the identity itself
    "control",  # a label for the report
    "eval",  # whether the final policy is evaluated (evaluation happens after training)
    "save_every", "keep_checkpoints",  # checkpoint cadence and retention
    "micro_batch_tokens",  # how rows are cut into micro-batches (gradients are summed per token either way)
    "rollout.vllm.gpu_memory_utilization", "rollout.vllm.cpu_kvcache_gib", "rollout.vllm.sleep",
    "rollout.vllm.verify_sync", "rollout.vllm.enforce_eager",  # engine memory / speed / debug checks
    "rollout.max_batch_tokens",  # how many rows the megatron sampler decodes at once (samples are per-row seeded)
    # where generation runs: at max_staleness 0 separate ranks produce the colocated samples (rollout.remote)
    "rollout.placement", "rollout.generation_ranks", "rollout.sync_timeout_s", "rollout.transfer_bucket_mib",
)
# Model fields (per model the stage holds) that change numerics; the rest (tp, pp, use_te, recompute, packing,
# hf/megatron source paths, which the base import pins) are neutral.
MODEL_RESULT_FIELDS = ("dtype", "fp8")


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k in sorted(obj):
            _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = list(obj) if isinstance(obj, tuple) else obj


def _neutral(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in NEUTRAL_STAGE_FIELDS)


def stage_fingerprint(plan: PlanConfig, stage: StageBase) -> dict[str, Any]:
    """All of the stage's settings, flat: its own fields under their dotted names, plus ``seed``, ``data.*`` and
    ``models.<role>.*`` (neutral fields included: :func:`result_changes` tells them apart)."""
    fields: dict[str, Any] = {}
    _flatten(dataclasses.asdict(stage), "", fields)
    if "rollout_correction.mode" in fields:  # the mode it runs: "auto" is "none" on-policy (as plans before it)
        fields["rollout_correction.mode"] = stage.rollout_correction.resolved(stage.rollout.max_staleness)
    fields["seed"] = plan.seed
    if stage.consumes_labels():
        fields["grader"] = plan.grader  # what grades its reward (a stage reading no labels grades nothing it trains on)
    d = plan.data
    _flatten({"pool": d.pool, "pool_limit": d.pool_limit, "instruction": d.instruction,
              "split": dataclasses.asdict(d.split)}, "data", fields)
    for role in stage.models():
        m = plan.models[role]
        _flatten({k: getattr(m, k) for k in ("dtype", "fp8", "tp", "pp", "use_te", "recompute", "pack_sequences")},
                 f"models.{role}", fields)
    return json.loads(json.dumps(fields, default=str))  # the form it has once read back from JSON


def is_neutral(name: str) -> bool:
    """Whether a fingerprint field cannot change the stage's result."""
    if name.startswith("models."):
        return name.rsplit(".", 1)[-1] not in MODEL_RESULT_FIELDS
    if name == "seed" or name.startswith("data."):
        return False
    return _neutral(name)


def fingerprint_digest(fields: dict[str, Any]) -> str:
    """Digest of the result-changing fields only (a neutral change keeps the digest)."""
    kept = {k: v for k, v in fields.items() if not is_neutral(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changes(old: dict[str, Any], new: dict[str, Any], neutral: bool) -> list[tuple[str, Any, Any]]:
    """Fields recorded on one side only are left out: a setting an older megatron-s2d did not have (or one since
    removed) cannot have been set otherwise by that run; :func:`unrecorded` lists them."""
    out = []
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if a != b and is_neutral(k) == neutral:
            out.append((k, a, b))
    return out


def unrecorded(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fields the plan has now that the record lacks (written by an older megatron-s2d): not compared."""
    return sorted(set(new) - set(old))


def result_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every result-changing field both sides record that differs."""
    return _changes(old, new, neutral=False)


def neutral_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every neutral field that differs (allowed; recorded)."""
    return _changes(old, new, neutral=True)


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
