"""Row routing between the stage's data-parallel ranks and a frozen scorer's replicas (pure planning)."""

import pytest

from megatron_s2d.errors import InternalError
from megatron_s2d.runtime.routing import Routing, balanced_split


def _weights(parts, w):
    return [sum(w[lo:hi]) for lo, hi in parts]


def test_balanced_split_covers_everything_contiguously():
    for n in range(0, 12):
        for parts in range(1, 6):
            w = [(7 * i) % 5 + 1 for i in range(n)]
            cut = balanced_split(w, parts)
            assert len(cut) == parts
            assert cut[0][0] == 0 and cut[-1][1] == n
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(cut, cut[1:]))


def test_balanced_split_balances_tokens_not_rows():
    w = [100, 1, 1, 1, 1, 1, 1, 100]
    assert _weights(balanced_split(w, 2), w) == [103, 103]
    w = [10] * 8
    assert _weights(balanced_split(w, 4), w) == [20, 20, 20, 20]
    assert _weights(balanced_split([1, 100], 2), [1, 100]) == [1, 100]  # the nearer edge, not [101, 0]
    # each part is within one item of the ideal share
    w = [3, 9, 2, 7, 7, 1, 8, 4, 6, 5]
    for parts in (2, 3, 4):
        ideal = sum(w) / parts
        for got in _weights(balanced_split(w, parts), w):
            assert abs(got - ideal) <= max(w)


def test_balanced_split_rejects_zero_parts():
    with pytest.raises(ValueError, match="parts"):
        balanced_split([1, 2], 0)


def test_routing_dedupes_ranks_of_one_dp_group_and_orders_rows_globally():
    # 4 ranks: student TP2 x DP2 -> ranks (0,1) are DP rank 0, ranks (2,3) DP rank 1
    announced = [(0, [5, 6]), (0, [5, 6]), (1, [7, 8, 9]), (1, [7, 8, 9])]
    r = Routing.plan(announced, replicas=2)
    assert r.source == {0: 0, 1: 2}
    assert r.stage_dp_of == [0, 0, 1, 1]
    flat = [x for piece in r.pieces for x in piece]
    assert flat == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert len(r.pieces) == 2 and all(r.pieces)


def test_routing_refuses_ranks_of_one_dp_group_with_different_rows():
    with pytest.raises(InternalError, match="ranks 0 and 1 are both stage data-parallel rank 0"):
        Routing.plan([(0, [5, 6]), (0, [5, 7])], replicas=1)
    # same lengths, different tokens: the fingerprint tells them apart
    with pytest.raises(InternalError, match="scorer: ranks 0 and 1"):
        Routing.plan([(0, [5, 6], 111), (0, [5, 6], 222)], replicas=1)
    Routing.plan([(0, [5, 6], 111), (0, [5, 6], 111)], replicas=1)


def test_routing_with_more_replicas_than_rows_leaves_some_idle():
    r = Routing.plan([(0, [4]), (1, [3])], replicas=4)
    assert sum(len(p) for p in r.pieces) == 2
    assert sum(1 for p in r.pieces if not p) == 2
