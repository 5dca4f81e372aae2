"""Frozen scorer (teacher, reference) in a TP/PP layout of its own, serving the stage's data-parallel ranks.

A 70B teacher at TP8 next to an 8B student at TP1: every rank of the job holds one shard of the teacher *and* one
of the student, but a teacher tensor-parallel group spans eight student data-parallel ranks, each with its own
rollouts. Scoring therefore routes rows, per call:

    1. every rank announces (its stage DP rank, its rows' lengths)                      all_gather_object (small)
    2. the rows of all stage DP ranks, in (dp rank, row) order, are cut into contiguous pieces of about equal
       token count, one per teacher replica (a replica = the tp * pp ranks holding one whole teacher)
    3. one rank per stage DP rank sends each replica its piece; the replica scores its rows (megatron pipeline
       schedule, the model's own groups)                                                    exchange (all_to_all)
    4. each replica's leader sends every rank the scores of that rank's rows                exchange (all_to_all)

When the scorer's layout is the job's own (a reference model in GRPO, or teacher tp/pp = student tp/pp), teacher
replica == stage DP rank and every rank simply scores its own rows: the ``MegatronModel`` itself is the scorer, and
this class is not built.

Results equal the single-process scores of the same rows (forward_values zeroes everything past a row's length,
so how rows are grouped into micro-batches does not matter): see tests/distributed/test_scorer_layout.py.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from megatron_s2d.errors import InternalError
from megatron_s2d.policy.batching import scatter_rows, slice_batch
from megatron_s2d.policy.scoring import ScoringMethods
from megatron_s2d.runtime.exchange import exchange
from megatron_s2d.runtime.routing import Routing


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (n_i, T_i, ...) tensors on dim 0, zero-padding dim 1 to the largest T_i."""
    t = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        if p.shape[1] < t:
            pad = torch.zeros((p.shape[0], t - p.shape[1]) + tuple(p.shape[2:]), dtype=p.dtype)
            p = torch.cat([p, pad], dim=1)
        out.append(p)
    return torch.cat(out, dim=0)


def _rows(batch: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of a batch cut to their longest length (``slice_batch``), compact so that pickling sends only
    those elements."""
    t = int(batch["lengths"][idx].max())
    return {k: v.contiguous() for k, v in slice_batch(batch, idx, t).items()}


class RoutedScorer(ScoringMethods):
    """A frozen :class:`~megatron_s2d.policy.model.MegatronModel` at a layout of its own that scores the calling
    rank's own rows: the ``Scorer`` interface (``logprobs``, ``logprobs_at``, ``topk``) over the routed
    ``forward_values``. Built only where the layouts differ (``policy.load.LoadedModel.scorer``); at the job's own
    layout the model itself is the scorer."""

    def __init__(self, model, stage_dp_rank: int):
        if model.groups.is_global:
            raise InternalError("RoutedScorer wraps a model at a layout of its own; at the job's layout the model "
                                "itself is the scorer")
        self.model = model
        self.groups = model.groups
        self.stage_dp_rank = stage_dp_rank
        self.micro_batch_tokens = model.micro_batch_tokens
        self.tp_group = model.tp_group

    @torch.no_grad()
    def forward_values(self, batch: dict[str, torch.Tensor], objective, micro_batch_tokens: int):
        g, me = self.groups, dist.get_rank()
        announced: list = [None] * dist.get_world_size()
        finger = zlib.crc32(batch["tokens"].cpu().numpy().tobytes())
        dist.all_gather_object(announced, (self.stage_dp_rank, batch["lengths"].tolist(), finger))
        route = Routing.plan(announced, g.dp)

        # 3. sources send each replica its rows (the scoring methods pass only the fields the objective reads)
        send = {}
        if route.source[self.stage_dp_rank] == me:
            for replica, piece in enumerate(route.pieces):
                mine = [i for s, i in piece if s == self.stage_dp_rank]
                if mine:
                    payload = (self.stage_dp_rank, mine, _rows(batch, mine))
                    for dst in g.ranks_of_replica(replica):
                        send[dst] = payload
        got = exchange(send)
        piece = route.pieces[g.dp_rank]
        if piece:
            parts = sorted(got.values(), key=lambda p: p[0])  # global order: by stage DP rank, rows ascending
            order = [(s, i) for s, idx, _ in parts for i in idx]
            if order != piece:
                raise InternalError(f"scorer routing: replica {g.dp_rank} expected rows {piece[:4]}..., got "
                                    f"{order[:4]}...")
            keys = parts[0][2].keys()
            union = {k: (_pad_cat([p[2][k] for p in parts]) if parts[0][2][k].dim() >= 2
                         else torch.cat([p[2][k] for p in parts])) for k in keys}
            values = self.model.forward_values(union, objective, micro_batch_tokens)
        else:  # no rows for this replica: its placeholder pass gives the objective's keys and shapes (0 rows each)
            values = self.model.forward_values({k: v[:0] for k, v in batch.items()}, objective, micro_batch_tokens)

        # 4. each replica's leader returns every rank the scores of its rows
        send = {}
        if piece and me == g.replica_leader:
            by_stage: dict[int, list[int]] = {}
            for j, (s, i) in enumerate(piece):
                by_stage.setdefault(s, []).append(j)
            payloads = {}
            for s, js in by_stage.items():
                sel = torch.tensor(js, dtype=torch.long)
                t = int(max(announced[route.source[s]][1][piece[j][1]] for j in js))
                payloads[s] = ([piece[j][1] for j in js],
                               {k: v.index_select(0, sel)[:, :t].contiguous() for k, v in values.items()})
            send = route.to_ranks(payloads)
        got = exchange(send)
        n, t = batch["tokens"].shape
        out = scatter_rows(((torch.tensor(idx, dtype=torch.long), vals) for idx, vals in got.values()), n, t)
        for k, v in values.items():  # a rank with no rows receives nothing: the same keys, (0, T, ...) each
            out.setdefault(k, torch.zeros((n, t) + tuple(v.shape[2:]), dtype=v.dtype))
        return out

