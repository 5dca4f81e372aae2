"""Data splits on disk: written once by the launcher (``write_splits``), read by every stage job (``read_split``).

    <data_dir>/splits.json          manifests of every split (content hash, count, sources, seed, parent hash)
    <data_dir>/split_<name>.jsonl   the members of one split, normalised

A stage verifies the members against the manifest when it reads them, so a changed file can never silently feed a
stage other data than its lineage says. Re-writing is idempotent; a split whose content changed is refused (stages
of the run were trained on the old one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_s2d.data.splits import Split, SplitManifest, set_hash
from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError, read_json, read_jsonl

MANIFEST = "splits.json"


def manifest_path(data_dir: Path) -> Path:
    return Path(data_dir) / MANIFEST


def split_path(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / f"split_{name}.jsonl"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_splits(data_dir: Path, splits: dict[str, Split]) -> dict[str, dict]:
    """Write members + manifests; refuses to change the content of a split that already exists."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifests = {name: s.manifest.to_dict() for name, s in splits.items()}
    if manifest_path(data_dir).is_file():
        old = read_json(manifest_path(data_dir))
        for name, m in manifests.items():
            if name in old and old[name]["content_hash"] != m["content_hash"]:
                raise S2DError(f"{manifest_path(data_dir)}: split {name!r} already exists with different content "
                               f"(hash {old[name]['content_hash'][:12]} vs {m['content_hash'][:12]}); stages of "
                               "this run were trained on the old split — use a new run_dir")
    for name, s in splits.items():
        _write_atomic(split_path(data_dir, name), "".join(json.dumps(p.to_dict()) + "\n" for p in s.problems))
    _write_atomic(manifest_path(data_dir), json.dumps(manifests, indent=1))
    return manifests


def read_manifests(data_dir: Path) -> dict[str, dict]:
    path = manifest_path(data_dir)
    if not path.is_file():
        raise S2DError(f"{path}: missing (the launcher prepares splits before any stage runs)")
    return read_json(path)


def read_split(data_dir: Path, name: str) -> list[Problem]:
    """The members of split ``name``, verified against their manifest."""
    manifests = read_manifests(data_dir)
    if name not in manifests:
        raise S2DError(f"split {name!r} not in {manifest_path(data_dir)}; splits: {sorted(manifests)}")
    path = split_path(data_dir, name)
    problems = []
    for d in read_jsonl(path):
        problems.append(Problem(id=d["id"], prompt=d["prompt"], answer=d["answer"], source=d["source"],
                                meta=d.get("meta") or {}, solution=d.get("solution")))
    manifest = SplitManifest.from_dict(manifests[name])
    if set_hash(p.content_hash() for p in problems) != manifest.content_hash or len(problems) != manifest.count:
        raise S2DError(f"{path}: members no longer match the manifest in {manifest_path(data_dir)} "
                       f"(expected {manifest.count} problems with hash {manifest.content_hash[:12]})")
    return problems
