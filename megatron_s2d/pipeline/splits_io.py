"""Data splits on disk: written once by the launcher (``prepare_splits``), read by every stage job.

The labeled pool is loaded (``data.sources.load_problems``), de-duplicated and split by content hash
(``data.splits.split_fractions``); each split's members go to ``<run_dir>/data/split_<name>.jsonl`` and all
manifests (content hash, count, sources, seed, parent hash) to ``splits.json``. Stages verify the members against
the manifest when they read them, so a changed file can never silently feed a stage other data than its lineage says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_s2d.config import PlanConfig
from megatron_s2d.data.sources import load_problems
from megatron_s2d.data.splits import SplitManifest, set_hash, split_fractions
from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError
from megatron_s2d.pipeline.layout import RunLayout

TOY_SOURCES = {"toy-train": "train.jsonl", "toy-test": "test.jsonl"}


def resolve_source(name: str) -> str:
    """Dataset names of the embedded toy world map to the shipped files; anything else passes through."""
    if name in TOY_SOURCES:
        return str(Path(__file__).resolve().parent.parent / "toy" / "data" / TOY_SOURCES[name])
    return name


def load_source(name: str, limit: int | None = None) -> list[Problem]:
    result = load_problems(resolve_source(name), limit=limit)
    if result.skipped:
        shown = "; ".join(str(e) for e in result.skipped[:5])
        print(f"[data] {name}: skipped {len(result.skipped)} malformed row(s): {shown}", flush=True)
    if not result.problems:
        raise S2DError(f"data source {name!r}: no usable problems ({len(result.skipped)} rows skipped)")
    return result.problems


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_splits(plan: PlanConfig, layout: RunLayout) -> dict[str, dict]:
    """Load the pool, split it, write members + manifests (idempotent: an identical existing split is kept)."""
    problems = load_source(plan.data.pool, plan.data.pool_limit)
    fractions = dict(plan.data.split.fractions)
    rest = 1.0 - sum(fractions.values())
    if rest > 1e-9:
        fractions["_unused"] = rest
    splits = split_fractions(problems, fractions, seed=plan.data.split.seed)
    layout.data.mkdir(parents=True, exist_ok=True)
    manifests = {name: s.manifest.to_dict() for name, s in splits.items()}
    if layout.splits_manifest.is_file():
        old = json.loads(layout.splits_manifest.read_text())
        for name, m in manifests.items():
            if name in old and old[name]["content_hash"] != m["content_hash"]:
                raise S2DError(f"{layout.splits_manifest}: split {name!r} already exists with different content "
                               f"(hash {old[name]['content_hash'][:12]} vs {m['content_hash'][:12]}); stages of "
                               "this run were trained on the old split — use a new run_dir")
    for name, s in splits.items():
        _write_atomic(layout.split_file(name), "".join(json.dumps(p.to_dict()) + "\n" for p in s.problems))
    _write_atomic(layout.splits_manifest, json.dumps(manifests, indent=1))
    return manifests


def read_manifests(layout: RunLayout) -> dict[str, dict]:
    if not layout.splits_manifest.is_file():
        raise S2DError(f"{layout.splits_manifest}: missing (the launcher prepares splits before any stage runs)")
    return json.loads(layout.splits_manifest.read_text())


def read_split(layout: RunLayout, name: str) -> list[Problem]:
    manifests = read_manifests(layout)
    if name not in manifests:
        raise S2DError(f"split {name!r} not in {layout.splits_manifest}; splits: {sorted(manifests)}")
    path = layout.split_file(name)
    problems = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        d = json.loads(line)
        problems.append(Problem(id=d["id"], prompt=d["prompt"], answer=d["answer"], source=d["source"],
                                meta=d.get("meta") or {}))
    manifest = SplitManifest.from_dict(manifests[name])
    if set_hash(p.content_hash() for p in problems) != manifest.content_hash or len(problems) != manifest.count:
        raise S2DError(f"{path}: members no longer match the manifest in {layout.splits_manifest} "
                       f"(expected {manifest.count} problems with hash {manifest.content_hash[:12]})")
    return problems
