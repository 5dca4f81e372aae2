"""Row routing between a stage's data-parallel ranks and the replicas of a model in a layout of its own.

A frozen teacher at TP8 next to a student at TP1 spans eight student data-parallel ranks per teacher replica, each
rank with its own rows. :class:`Routing` decides, identically on every rank (from all-gathered announcements), which
replica handles which rows: the rows of all stage DP ranks, in (dp rank, row) order, are cut into contiguous pieces
of about equal weight (tokens), one per replica. ``policy.scorer.RoutedScorer`` (scoring) and
``rollout.routed.RoutedEngine`` (generation) both route through it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from megatron_s2d.errors import InternalError


def balanced_split(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``weights`` into ``parts`` contiguous [lo, hi) ranges of about equal total weight (some may be empty).

    Boundary k goes to whichever item edge lies nearer to k/parts of the running total, so each part's weight is
    within one item of the ideal.
    """
    if parts < 1:
        raise ValueError(f"balanced_split: parts must be >= 1, got {parts}")
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    total = cum[-1]
    bounds = [0]
    for k in range(1, parts):
        target = total * k / parts
        i = bisect.bisect_left(cum, target)  # first edge with running total >= target
        if i > 0 and (i == len(cum) or target - cum[i - 1] <= cum[i] - target):
            i -= 1
        bounds.append(min(max(bounds[-1], i), len(weights)))
    bounds.append(len(weights))
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


@dataclass(frozen=True)
class Routing:
    """Who scores which rows (identical on every rank: computed from the all-gathered announcements)."""

    source: dict[int, int]  # stage DP rank -> the global rank that sends its rows (the lowest holding them)
    stage_dp_of: list[int]  # global rank -> its stage DP rank
    pieces: list[list[tuple[int, int]]]  # replica -> [(stage DP rank, row index), ...] in global order

    @staticmethod
    def plan(announced: list[tuple], replicas: int, what: str = "scorer") -> "Routing":
        """``announced[rank] = (stage_dp_rank, row weights, fingerprint)`` for every global rank; ranks of one stage
        DP rank must announce the same weights and fingerprint (a checksum of their rows)."""
        source: dict[int, int] = {}
        seen: dict[int, tuple] = {}
        for rank, (s, lens, *finger) in enumerate(announced):
            if s not in source:
                source[s], seen[s] = rank, (list(lens), finger)
            elif seen[s] != (list(lens), finger):
                raise InternalError(f"{what}: ranks {source[s]} and {rank} are both stage data-parallel rank {s} but hold "
                               f"different rows; every rank of a data-parallel group must pass the same batch")
        lengths = {s: v[0] for s, v in seen.items()}
        rows = [(s, i) for s in sorted(source) for i in range(len(lengths[s]))]
        weights = [lengths[s][i] for s, i in rows]
        pieces = [rows[lo:hi] for lo, hi in balanced_split(weights, replicas)]
        return Routing(source=source, stage_dp_of=[a[0] for a in announced], pieces=pieces)

    def to_ranks(self, per_stage: dict) -> dict:
        """``{stage DP rank: obj}`` -> ``{global rank: obj}``: every rank of that stage DP rank gets the object."""
        return {dst: per_stage[s] for dst, s in enumerate(self.stage_dp_of) if s in per_stage}
