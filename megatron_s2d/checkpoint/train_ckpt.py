"""Training checkpoints: model + optimizer (megatron dist_checkpointing), scheduler, RNG, trainer state, manifest.

Layout of one checkpoint (a superset of the model-checkpoint format of ``checkpoint.model_ckpt``, so any training
checkpoint is also a model checkpoint that the next stage loads and ``s2d convert megatron-to-hf`` exports)::

    step_000004/
      s2d_model.json  tokenizer/  hf_extra/      model metadata (written by checkpoint.model_ckpt.write_model_meta)
      model/                                     dist checkpoint: model weights (what checkpoint.model_ckpt loads)
      optim/                                     dist checkpoint: optimizer state (resharding-capable)
      rng/rank_00000.{safetensors,json}          per-rank torch / CUDA / megatron-tracker / Python / numpy RNG states
      trainer_state.json                         step, scheduler, ledger
      manifest.json                              every file's size and CRC-32 (written last)

Atomic: everything is written into ``step_000004.tmp`` and renamed at the end; ``latest`` (a one-line text file,
itself replaced atomically) then points at it, and checkpoints beyond the newest ``keep`` are deleted (only once the
new one is complete: its manifest pass read every byte back, and every file is in place under its final name).
Nothing is loaded with pickle by us; the dist-checkpoint parts that torch / megatron unpickle are checked first
(``checkpoint.safe_load``). Resume (:func:`resume_checkpoint`) verifies the newest checkpoint against its manifest
and, when a file is damaged or missing, says which, sets the checkpoint aside (``step_N.damaged``) and falls back to
the previous complete one; an interrupted ``.tmp`` never counts (and is removed at resume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from megatron_s2d.checkpoint.manifest import verify_manifest, write_manifest
from megatron_s2d.checkpoint.rng_state import load_rng_state, save_rng_state, set_rng_state
from megatron_s2d.errors import S2DError, read_json


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(root: Path) -> Path | None:
    """The last complete checkpoint under ``root`` (None if there is none)."""
    ptr = Path(root) / "latest"
    if not ptr.is_file():
        return None
    path = Path(root) / ptr.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise S2DError(f"{ptr}: points at {path}, which is not a complete checkpoint (no trainer_state.json)")
    return path


_STEP = re.compile(r"^step_(\d{6,})$")


def complete_checkpoints(root: Path) -> list[Path]:
    """The renamed (complete) checkpoints under ``root``, newest first (interrupted ``.tmp`` folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)), reverse=True)


def _from_rank0(obj):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection; no longer counted or resumed from)."""
    n, dest = 0, path.with_name(path.name + ".damaged")
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, dest)
    return dest


def resume_checkpoint(root: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint under ``root`` that is intact, or None. Collective: call it on every rank (rank 0 lists
    the folder, the verdicts are gathered), every rank gets the same answer.

    A damaged checkpoint (a file missing, truncated or changed since its manifest was written, or no manifest) is
    reported with the file's name and the previous one is tried. Damaged checkpoints newer than the one returned
    are renamed ``step_N.damaged`` (so ``latest``, pruning and the stage's final checkpoint never pick them; delete
    them once inspected), ``latest`` is pointed at the one returned, and interrupted ``.tmp`` saves are removed.
    None when no checkpoint is intact (a WARNING says so): the stage starts over from its initial weights. Starting
    over rather than raising: it is always correct (the stage is a pure function of its inputs and seed) and needs
    nobody awake at night; it only costs time, and the damaged checkpoints stay for inspection."""
    root = Path(root)
    rank0 = _rank() == 0
    if rank0 and root.is_dir():
        for tmp in root.glob("step_*.tmp"):  # an interrupted save (the stage lock says no other job is writing)
            shutil.rmtree(tmp, ignore_errors=True)
    candidates = _from_rank0(complete_checkpoints(root) if rank0 else None)
    chosen, damaged = None, []
    for path in candidates:
        problems = verify_manifest(path)
        if not problems:
            chosen = path
            break
        damaged.append(path)
        log(f"checkpoint {path} is damaged, not resuming from it: {'; '.join(problems[:3])}"
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    if damaged:
        if rank0:
            for path in damaged:
                try:
                    log(f"set aside as {_set_aside(path)} (delete it once inspected)")
                except OSError as e:  # carry on: `latest` below still keeps it from being the final checkpoint
                    log(f"WARNING: could not set {path} aside ({e}); delete it")
            if chosen is not None:
                _atomic_write_text(root / "latest", chosen.name + "\n")
            else:
                (root / "latest").unlink(missing_ok=True)
        if chosen is None:
            log(f"WARNING: none of the {len(damaged)} checkpoint(s) under {root} is intact: the stage starts over "
                "from its initial weights")
        _barrier()
    return chosen


def save_train_checkpoint(policy, root: Path, step: int, trainer_state: dict, write_meta, keep: int = 2) -> Path:
    """Collective. ``write_meta(dir)`` writes the model metadata files (rank 0 only). Keeps the newest ``keep``
    checkpoints (older ones are deleted after this one is complete)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        for sub in ("model", "optim", "rng"):
            (tmp / sub).mkdir(parents=True)
    _barrier()
    from megatron_s2d.checkpoint.model_ckpt import sync_save_strategy

    model_sd = policy.module.sharded_state_dict()
    optim_sd = {"optimizer": policy.optimizer.sharded_state_dict(model_sd)}
    dist_checkpointing.save(model_sd, str(tmp / "model"), sharded_strategy=sync_save_strategy())
    dist_checkpointing.save(optim_sd, str(tmp / "optim"), sharded_strategy=sync_save_strategy())
    save_rng_state(tmp / "rng" / f"rank_{_rank():05d}")
    _barrier()
    if _rank() == 0:
        write_meta(tmp)
        full_state = dict(trainer_state, step=step, scheduler=policy.scheduler.state_dict())
        (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1, default=float))
    _barrier()
    write_manifest(tmp)  # last: a checkpoint with a manifest was written to the end (and every byte read back)
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
    _barrier()
    problems = verify_manifest(final, checksums=False)  # every file in place under its final name (cheap: stat)
    if _rank() == 0:
        if problems:
            print(f"WARNING: checkpoint {final} does not match its manifest right after the save "
                  f"({'; '.join(problems[:3])}); older checkpoints are kept", flush=True)
        else:
            for old in complete_checkpoints(root)[max(keep, 1):]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_train_checkpoint(policy, path: Path) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; return the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint
    from megatron_s2d.checkpoint.safe_load import check_dist_checkpoint

    for sub in ("model", "optim"):  # torch / megatron unpickle parts of these: refuse a planted payload first
        check_dist_checkpoint(path / sub)
    load_model_checkpoint(policy.module, path)
    model_sd = policy.module.sharded_state_dict()
    optim_sd = {"optimizer": policy.optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(optim_sd, str(path / "optim"))
    policy.optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = read_json(path / "trainer_state.json")
    policy.scheduler.num_steps = 0  # megatron's load_state_dict *adds* the saved count to the current one
    policy.scheduler.load_state_dict(trainer_state["scheduler"])
    prefix = path / "rng" / f"rank_{_rank():05d}"
    if prefix.with_suffix(".safetensors").is_file() or prefix.with_suffix(".pt").is_file():
        set_rng_state(load_rng_state(prefix))  # refuses a pickled .pt; absent when resuming on more ranks
    return trainer_state
