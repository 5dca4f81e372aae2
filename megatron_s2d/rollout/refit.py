"""Weight refit: stream the live megatron policy into a rollout engine, in memory, and time it.

    stats = refit_from_policy(engine, model, arch)     # every rank of the job calls this
    log({"refit_s": stats.seconds, "refit_s_per_gb": stats.seconds_per_gb})

``megatron_s2d.checkpoint.model_ckpt.export_hf_state`` yields full (TP- and PP-gathered), HF-named tensors one
megatron tensor at a time; the engine's ``update_weights`` consumes them as they come (the vLLM engine ships them in
layer-aligned chunks), so at most about one chunk is in flight, never a second copy of the model. The export is a
collective: every rank must iterate it to the end in the same order, including ranks without an engine. On those
ranks pass ``engine=None``: they drain the export (taking part in its all-gathers / broadcasts) and count the same
bytes. Only the rank that owns the engine loads anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.rollout.base import RolloutEngine

__all__ = ["RefitStats", "refit_from_policy", "stream_refit"]


@dataclass(frozen=True)
class RefitStats:
    seconds: float  # export + transfer + load, wall clock on this rank
    bytes: int  # bytes of the exported tensors (in the policy's dtype)
    tensors: int

    @property
    def seconds_per_gb(self) -> float:
        return self.seconds / max(self.bytes / 1e9, 1e-12)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stream_refit(engine: RolloutEngine | None, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RefitStats:
    """Feed ``named_tensors`` into ``engine.update_weights`` (or just drain them when ``engine`` is None)."""
    count = {"bytes": 0, "tensors": 0}

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            count["bytes"] += tensor.numel() * tensor.element_size()
            count["tensors"] += 1
            yield name, tensor

    _sync()
    start = time.perf_counter()
    stream = counted()
    if engine is None:
        for _ in stream:
            pass
    else:
        try:
            engine.update_weights(stream)
        finally:  # an engine that stops early (or fails) must not leave the other ranks waiting in the export
            for _ in stream:
                pass
    _sync()
    return RefitStats(seconds=time.perf_counter() - start, bytes=count["bytes"], tensors=count["tensors"])


def refit_from_policy(engine: RolloutEngine | None, model, arch: ArchSpec) -> RefitStats:
    """Load the policy's current weights into ``engine`` (collective over the model's ranks; see the module doc)."""
    from megatron_s2d.checkpoint.model_ckpt import export_hf_state

    return stream_refit(engine, export_hf_state(model, arch))
