"""Run-folder state that is not a model, stored without pickle: ``<prefix>.safetensors`` (tensors) beside
``<prefix>.json`` (a header with a ``format`` field). The RNG states of training checkpoints (``rng_state``) and the
forward-KL warmup's teacher-sample cache (``rollout.sample_store``) are such pairs.

    write_pair(prefix, tensors, header)                     # atomic: temp files renamed into place, the header last
    header, tensors = read_pair(prefix, FORMAT, "RNG state", fix="restart the stage")

Reading executes no code from the files (a run folder can come from someone else on a shared filesystem); an older
pickled ``<prefix>.pt`` where a pair is expected is refused with a message, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_s2d.errors import S2DError


def pair_paths(prefix: Path) -> tuple[Path, Path]:
    """(``prefix.safetensors``, ``prefix.json``)."""
    prefix = Path(prefix)
    return prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")


def pair_exists(prefix: Path) -> bool:
    st, js = pair_paths(prefix)
    return st.is_file() and js.is_file()


def write_pair(prefix: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write the tensors, then the header (each to a temp file renamed into place): a reader that finds the header
    finds the tensors it describes."""
    from safetensors.torch import save_file

    st, js = pair_paths(prefix)
    st.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(st) + ".tmp")
    os.replace(str(st) + ".tmp", st)
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(header))
    os.replace(tmp, js)


def read_pair(prefix: Path, fmt: str, what: str, fix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of the pair at ``prefix``, whose header's ``format`` must be ``fmt``. Every refusal is an
    S2DError naming the file, saying it is a ``what`` (e.g. "RNG state") and ending with ``fix`` (what to do)."""
    from safetensors.torch import load_file

    st, js = pair_paths(prefix)
    if not pair_exists(prefix):
        old = Path(prefix).with_suffix(".pt")
        if old.is_file():
            raise S2DError(f"{old}: a pickled {what} (an older megatron-s2d); it is not loaded, because unpickling a "
                           f"file from a run folder can run code; {fix}")
        raise S2DError(f"{js if st.is_file() else st}: no {what} here; {fix}")
    try:
        header = json.loads(js.read_text())
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - json, OS and safetensors errors alike: not a pair this version wrote
        raise S2DError(f"{prefix}: unreadable {what} ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(header, dict) or header.get("format") != fmt:
        got = header.get("format") if isinstance(header, dict) else header
        raise S2DError(f"{js}: field 'format' = {got!r}, expected {fmt!r} ({what}); {fix}")
    return header, tensors
