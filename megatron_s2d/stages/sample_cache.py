"""A per-data-parallel-rank sample cache in a stage's folder (the teacher's rollouts of the forward-KL warmup, a
rejection round's kept samples), read and written collectively: every rank of the job uses its cache, or none does
(generating is collective over the whole job), and one rank per data-parallel group writes.

    cached = load(path, accept, log, what)  # (samples, header) on every rank, or None on every rank
    save(path, samples, header)             # after generating; every rank calls it
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from megatron_s2d.errors import S2DError
from megatron_s2d.rollout import sample_store
from megatron_s2d.runtime.dist import all_ranks_agree, is_dp_writer


def load(path: Path, accept: Callable[[list, dict | None], None], log,
         what: str = "cache") -> tuple[list, dict | None] | None:
    """This rank's cached samples and their header if every rank has a cache that ``accept(samples, header)`` takes
    (it raises S2DError naming what differs: the cache is then regenerated, on every rank), else None everywhere."""
    cached = None
    if all_ranks_agree(sample_store.exists(path)):
        try:
            header = sample_store.read_provenance(path)
            samples = sample_store.load_samples(path)
            accept(samples, header)
            cached = (samples, header)
        except S2DError as e:  # corrupt, planted, or made with other settings
            log(f"{what} not used ({e}); regenerating {path}")
            cached = None
    return cached if all_ranks_agree(cached is not None) else None


def save(path: Path, samples: list, header: dict) -> None:
    """Write this data-parallel group's samples (its TP/PP peers hold the same ones); collective."""
    import torch

    if is_dp_writer():
        sample_store.save_samples(path, samples, header)
    torch.distributed.barrier()
