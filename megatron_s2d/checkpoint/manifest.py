"""Checkpoint manifests: every file's size and CRC-32, written with the checkpoint, verified before a resume.

    write_manifest(tmp_dir)                  # collective: ranks checksum disjoint sets of files, rank 0 writes
    problems = verify_manifest(ckpt_dir)     # collective: [] when every file is there, whole and unchanged

A checkpoint whose last write was cut short (a node died, a quota filled up, someone truncated a file) must not end
the resumed job in an ``EOFError`` deep inside torch.distributed.checkpoint: the resume verifies the newest checkpoint
first, names the damaged file, and falls back to the previous one (``train_ckpt.resume_checkpoint``). Files are
spread over ranks (sorted names, round-robin) so checksumming a large checkpoint costs each rank its share; CRC-32
(zlib, C speed: ~1-2 GB/s per core) detects truncation, missing and corrupted files. Measured figures are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT = "megatron-s2d/manifest/v1"
BLOCK = 4 << 20


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt_dir: Path) -> dict:
    """Checksum every file under ``ckpt_dir`` (collective; every rank must see the same files: call it after a
    barrier that follows all writes) and write ``manifest.json`` (rank 0). Returns the manifest."""
    ckpt_dir = Path(ckpt_dir)
    rank, world = _world()
    names = _gather(_files(ckpt_dir) if rank == 0 else None)[0]
    mine = {n: {"size": (ckpt_dir / n).stat().st_size, "crc32": crc32_of(ckpt_dir / n)}
            for i, n in enumerate(names) if i % world == rank}
    files = {k: v for part in _gather(mine) for k, v in part.items()}
    manifest = {"format": FORMAT, "files": dict(sorted(files.items()))}
    if rank == 0:
        (ckpt_dir / MANIFEST).write_text(json.dumps(manifest, indent=0))
    return manifest


def verify_manifest(ckpt_dir: Path, checksums: bool = True) -> list[str]:
    """Problems with the checkpoint at ``ckpt_dir`` against its manifest (collective; every rank gets the same
    list): a missing manifest, a missing file, a wrong size, a wrong checksum. Empty: the checkpoint is intact."""
    ckpt_dir = Path(ckpt_dir)
    rank, world = _world()
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return [f"{path}: missing (every checkpoint of this version has one; the save was cut short)"]
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"{path}: unreadable ({e})"]
    problems = []
    for i, (name, want) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        f = ckpt_dir / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        elif checksums and crc32_of(f) != want["crc32"]:
            problems.append(f"{f}: checksum differs from the manifest (corrupted)")
    return sorted(p for part in _gather(problems) for p in part)
