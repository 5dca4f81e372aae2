"""A step's rows are cut into updates_per_step mini-batches that are never empty while there are enough rows."""

import pytest

from megatron_s2d.policy.trainer import mini_batches


@pytest.mark.parametrize("n,u", [(12, 8), (8, 8), (13, 4), (100, 7), (5, 1)])
def test_pieces_are_contiguous_balanced_and_never_empty(n, u):
    pieces = mini_batches(n, u)
    assert len(pieces) == u
    assert [i for p in pieces for i in p] == list(range(n))
    sizes = [len(p) for p in pieces]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_fewer_rows_than_updates_leaves_only_the_unavoidable_empties():
    # ceil(12 / 8) = 2-row pieces would leave pieces 6 and 7 empty; balanced pieces have 1 or 2 rows
    assert [len(p) for p in mini_batches(12, 8)] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert [len(p) for p in mini_batches(2, 4)] == [1, 1, 0, 0]
    assert [len(p) for p in mini_batches(0, 3)] == [0, 0, 0]
