"""Process groups for a model whose TP/PP layout differs from the job's (the frozen teacher next to the student).

megatron-core's ``parallel_state`` holds *one* layout per process: the trainable policy's. A frozen teacher at
another (tp, pp) gets its own groups here, handed to the model as a megatron-core 0.16 ``ProcessGroupCollection``
(``GPTModel(pg_collection=...)``, and the pipeline schedule's ``p2p_communicator``/``pg_collection``).

Rank order is megatron's default (``tp-cp-ep-dp-pp``, cp = ep = 1): tensor-parallel ranks are adjacent, then data
parallel, pipeline stages outermost::

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)          dp = world // (tp * pp)

so TP groups stay inside a node whenever tp divides the GPUs per node. A *replica* is the tp * pp ranks that hold one
whole copy of the model (megatron's model-parallel group); replica ``r`` is this layout's data-parallel rank ``r``.
``torch.distributed.new_group`` is collective over the whole world, so every rank creates every group, in the same
order; layouts are cached, each is created once per process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_s2d.errors import S2DError


@dataclass(frozen=True)
class ModelGroups:
    """This rank's place in a (tp, pp) layout over the world, and the process groups of that layout."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int  # = the replica this rank belongs to
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    is_global: bool  # True when these are parallel_state's own groups (the job's layout)

    def ranks_of_replica(self, replica: int) -> tuple[int, ...]:
        """Global ranks holding replica ``replica`` (tp * pp of them), ascending."""
        return tuple(sorted(rank_of(t, replica, p, self.tp, self.dp) for t in range(self.tp) for p in range(self.pp)))

    @property
    def replica_ranks(self) -> tuple[int, ...]:
        return self.ranks_of_replica(self.dp_rank)

    @property
    def replica_leader(self) -> int:
        return self.replica_ranks[0]

    def p2p_communicator(self, config):
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        return P2PCommunicator(pp_group=self.pg_collection.pp, config=config)


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


_CACHE: dict[tuple[int, int, int], ModelGroups] = {}


def model_groups(tp: int, pp: int) -> ModelGroups:
    """The groups of layout (tp, pp) over the current world: parallel_state's if it is the job's layout, else new
    ones (created collectively on first use; every rank must call this with the same arguments)."""
    from megatron.core import parallel_state as ps

    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise S2DError(f"layout tp={tp} x pp={pp} does not divide the world size {world}")
    dp = world // (tp * pp)
    coords = dict(tp=tp, pp=pp, dp=dp, tp_rank=rank % tp, pp_rank=rank // (tp * dp), dp_rank=(rank // tp) % dp)
    if (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_pipeline_model_parallel_world_size() == pp):
        from megatron.core.process_groups_config import ProcessGroupCollection

        pgs = ProcessGroupCollection.use_mpu_process_groups(
            ["tp", "pp", "mp", "cp", "tp_cp", "embd", "pos_embd", "dp", "dp_cp"])
        return ModelGroups(**coords, pg_collection=pgs, is_global=True)
    key = (world, tp, pp)
    if key not in _CACHE:
        _CACHE[key] = ModelGroups(**coords, pg_collection=_create(tp, pp, dp, rank), is_global=False)
    return _CACHE[key]


def _create(tp: int, pp: int, dp: int, rank: int):
    """The ProcessGroupCollection of layout (tp, pp, dp) for ``rank`` (collective: every group of every kind)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    def groups(rank_lists: list[list[int]]):
        """Create every group of one kind (collective); return the one containing this rank (or None)."""
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    tp_lists = [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    pp_lists = [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    dp_lists = [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    mp_lists = [sorted(rank_of(t, d, p, tp, dp) for t in range(tp) for p in range(pp)) for d in range(dp)]
    # tied input/output embeddings are kept equal across the first and last stage; rope needs no position group
    embd_lists = [sorted({lst[0], lst[-1]}) for lst in pp_lists]
    pos_lists = [[lst[0]] for lst in pp_lists]
    cp_lists = [[r] for r in range(tp * pp * dp)]
    pgs = ProcessGroupCollection()
    pgs.tp = groups(tp_lists)
    pgs.pp = groups(pp_lists)
    pgs.dp = groups(dp_lists)
    pgs.dp_cp = pgs.dp
    pgs.mp = groups(mp_lists)
    pgs.embd = groups(embd_lists)
    pgs.pos_embd = groups(pos_lists)
    pgs.cp = groups(cp_lists)
    pgs.tp_cp = pgs.tp
    return pgs


def clear_cache() -> None:
    """Forget cached layouts (after the world is destroyed, e.g. between tests in one process)."""
    _CACHE.clear()
