import random

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.policy.batching import plan_micro_batches, slice_batch


def test_budget_respected_every_row_once_and_deterministic():
    rng = random.Random(0)
    lengths = [rng.randint(5, 100) for _ in range(57)]
    plan = plan_micro_batches(lengths, 400)
    assert sorted(i for g in plan.groups for i in g) == list(range(57))
    for g, l in zip(plan.groups, plan.lengths):
        assert l == max(lengths[i] for i in g) and len(g) * l <= 400
    assert plan == plan_micro_batches(lengths, 400)
    # sorting by length keeps padding waste low
    assert plan.padded_tokens < 1.3 * sum(lengths)


def test_too_long_sequence_is_refused():
    with pytest.raises(S2DError, match="micro_batch_tokens = 10 is smaller than the longest sequence"):
        plan_micro_batches([5, 11], 10)


def test_slice_batch_trims_time_axis():
    b = {"tokens": torch.arange(20).view(4, 5), "lengths": torch.tensor([5, 2, 3, 1]),
         "topk": torch.zeros(4, 5, 3)}
    out = slice_batch(b, [1, 2], 3)
    assert out["tokens"].tolist() == [[5, 6, 7], [10, 11, 12]]
    assert out["lengths"].tolist() == [2, 3] and out["topk"].shape == (2, 3, 3)
