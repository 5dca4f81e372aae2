"""Training checkpoints: model + optimizer (megatron dist_checkpointing), scheduler, RNG, trainer state.

Layout of one checkpoint (a superset of the model-checkpoint format of ``runtime.model_ckpt``, so any training
checkpoint is also a model checkpoint that the next stage loads and ``s2d convert megatron-to-hf`` exports)::

    step_000004/
      s2d_model.json  tokenizer/  hf_extra/      model metadata (written by runtime.model_ckpt.write_model_meta)
      model/                                     dist checkpoint: model weights (what runtime.model_ckpt loads)
      optim/                                     dist checkpoint: optimizer state (resharding-capable)
      rng/rank_00000.pt                          per-rank torch / megatron-tracker RNG states
      trainer_state.json                         step, scheduler, data position, ledger, metrics history

Atomic: everything is written into ``step_000004.tmp`` and renamed by rank 0 at the end; ``latest`` (a one-line text
file, itself replaced atomically) then points at it. A half-written checkpoint never looks complete, and resume
always reads the last *complete* one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron_s2d.errors import S2DError


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest_checkpoint(root: Path) -> Path | None:
    """The last complete checkpoint under ``root`` (None if there is none)."""
    ptr = Path(root) / "latest"
    if not ptr.is_file():
        return None
    path = Path(root) / ptr.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise S2DError(f"{ptr}: points at {path}, which is not a complete checkpoint (no trainer_state.json)")
    return path


def save_train_checkpoint(policy, root: Path, step: int, trainer_state: dict, write_meta) -> Path:
    """Collective. ``write_meta(dir)`` writes the model metadata files (rank 0 only)."""
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
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        write_meta(tmp)
        full_state = dict(trainer_state, step=step, scheduler=policy.scheduler.state_dict())
        (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1, default=float))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
    _barrier()
    return final


def load_train_checkpoint(policy, path: Path) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; return the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint

    load_model_checkpoint(policy.module, path)
    model_sd = policy.module.sharded_state_dict()
    optim_sd = {"optimizer": policy.optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(optim_sd, str(path / "optim"))
    policy.optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    policy.scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
