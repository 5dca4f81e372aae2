"""Random-number-generator states on disk without pickle: safetensors for the tensors, JSON for the rest.

    save_rng_state(ckpt / "rng" / "rank_00003")      # writes rank_00003.safetensors + rank_00003.json
    set_rng_state(load_rng_state(ckpt / "rng" / "rank_00003"))

What a stage must restore to resume bit-identically: torch's CPU generator, CUDA's (on GPU), megatron's RNG tracker
(dropout streams per TP rank), Python's ``random`` and numpy's global generator. Nothing here executes code from the
file: a run folder can come from someone else (a shared cluster filesystem) and loading it must not run their code.
An older checkpoint with a pickled ``rank_*.pt`` is refused with a message instead of being unpickled.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megatron_s2d.checkpoint.tensor_pair import read_pair, write_pair
from megatron_s2d.errors import S2DError

FORMAT = "megatron-s2d/rng/v1"


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


def save_rng_state(prefix: Path, state: dict | None = None) -> None:
    """Write ``prefix.safetensors`` (generator tensors) and ``prefix.json`` (Python / numpy scalars)."""
    state = rng_state() if state is None else state
    tensors = {"torch": state["torch"].contiguous()}
    if state.get("cuda") is not None:
        tensors["cuda"] = state["cuda"].cpu().contiguous()
    for name, t in state["tracker"].items():
        tensors[f"tracker.{name}"] = t.cpu().contiguous()
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, py_gauss = state["python"]
    meta = {"format": FORMAT, "python": [version, list(internal), py_gauss],
            "numpy": [kind, int(pos), int(has_gauss), float(gauss)], "tracker": sorted(state["tracker"])}
    write_pair(prefix, tensors, meta)


def load_rng_state(prefix: Path) -> dict:
    """The state written by :func:`save_rng_state` (never unpickles anything)."""
    meta, tensors = read_pair(prefix, FORMAT, "RNG state",
                              fix="resume from a checkpoint this version wrote, or restart the stage")
    try:
        version, internal, py_gauss = meta["python"]
        kind, pos, has_gauss, gauss = meta["numpy"]
        return {"torch": tensors["torch"], "cuda": tensors.get("cuda"),
                "python": (version, tuple(internal), py_gauss),
                "numpy": (kind, tensors["numpy.keys"].numpy().view(np.uint32), pos, has_gauss, gauss),
                "tracker": {name: tensors[f"tracker.{name}"] for name in meta["tracker"]}}
    except (KeyError, TypeError, ValueError) as e:
        raise S2DError(f"{prefix}: malformed RNG state ({type(e).__name__}: {e})") from e
