import random

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.models.build import token_multiple
from megatron_s2d.policy.batching import (block_causal_mask, pack_rows, pad_packed, plan_micro_batches, plan_packs,
                                          slice_batch)
from megatron_s2d.policy.objectives import from_packed, to_packed


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


# ------------------------------------------------------------------------------------------ packing


def test_plan_packs_first_fit_decreasing_under_budget():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    plan = plan_packs(lengths, 10)
    assert sorted(i for g in plan.groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in plan.groups)
    assert plan.lengths == [sum(lengths[i] for i in g) for g in plan.groups]
    assert plan.padded_tokens == sum(lengths)  # nothing is padding
    assert plan.groups == [[4, 3], [0, 1], [2, 6, 5]]  # FFD: 8+2, 7+3, 5+4+1
    assert plan_packs(lengths, 10).groups == plan.groups  # deterministic
    assert len(plan_packs(lengths, 100).groups) == 1
    with pytest.raises(S2DError, match="smaller than the longest sequence"):
        plan_packs(lengths, 7)
    assert plan_packs([], 10).groups == []


def test_pack_rows_layout_and_round_trip():
    tokens = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    batch = {"tokens": tokens, "lengths": torch.tensor([3, 2, 4]), "loss_mask": (tokens > 0).float(),
             "adv": torch.tensor([1.0, 2.0, 3.0])}
    mb = pack_rows(batch, [2, 0])
    assert mb["packed_tokens"].tolist() == [[6, 7, 8, 9, 1, 2, 3]]
    assert mb["pack_positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert mb["cu_seqlens"].tolist() == [0, 4, 7] and mb["cu_seqlens"].dtype == torch.int32
    assert mb["tokens"].shape == (2, 4) and mb["adv"].tolist() == [3.0, 1.0]
    assert mb["pack_index"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 0]]
    packed = to_packed(mb["tokens"], mb)
    assert torch.equal(packed, mb["packed_tokens"])
    back = from_packed(packed.float(), mb)
    # position 0 of each row (predicted from the previous sequence) and padding are zero
    assert back.tolist() == [[0.0, 7.0, 8.0, 9.0], [0.0, 2.0, 3.0, 0.0]]
    vec = torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2)
    assert from_packed(vec, mb).shape == (2, 4, 2)


def test_block_causal_mask_keeps_attention_within_each_sequence():
    m = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32))[0, 0]
    allowed = (~m).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 1]]


# ------------------------------------------------------------------------------------------ token multiple (FP8, SP)


def test_token_multiple_per_recipe_and_sequence_parallel():
    assert [token_multiple(r, 1, False) for r in (None, "delayed", "tensorwise", "blockwise")] == [1, 16, 16, 128]
    assert token_multiple(None, 8, True) == 8 and token_multiple("delayed", 8, True) == 16
    assert token_multiple("tensorwise", 2, False) == 16  # no sequence parallelism: TP does not split T
    assert token_multiple("blockwise", 8, True) == 128 and token_multiple(None, 3, True) == 3
    with pytest.raises(S2DError, match="model.fp8"):
        token_multiple("mxfp8", 1, False)


def _odd_batch(lengths, k=3):
    g = torch.Generator().manual_seed(3)
    n, t = len(lengths), max(lengths)
    tokens = torch.randint(1, 50, (n, t), generator=g)
    lens = torch.tensor(lengths)
    valid = torch.arange(t)[None, :] < lens[:, None]
    return {"tokens": tokens * valid, "lengths": lens, "loss_mask": valid.float(),
            "topk_ids": torch.randint(0, 50, (n, t, k), generator=g), "advantages": torch.randn(n)}


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_micro_batches_are_padded_to_the_fp8_multiple(recipe):
    """Every micro-batch's T (and so rows x T, the flattened token dim of each GEMM) is a multiple of the recipe's
    token multiple, within the budget; the added positions are zero (loss_mask 0)."""
    m = token_multiple(recipe, 1, False)
    rng = random.Random(1)
    lengths = [rng.randint(3, 300) for _ in range(41)]
    batch = _odd_batch(lengths)
    plan = plan_micro_batches(lengths, 2048, m)
    assert sorted(i for g in plan.groups for i in g) == list(range(len(lengths)))
    for rows, length in zip(plan.groups, plan.lengths):
        longest = max(lengths[i] for i in rows)
        assert length % m == 0 and longest <= length < longest + m and len(rows) * length <= 2048
        mb = slice_batch(batch, rows, length)
        assert mb["tokens"].shape == (len(rows), length) and mb["topk_ids"].shape == (len(rows), length, 3)
        assert mb["tokens"].numel() % m == 0
        t = batch["tokens"].shape[1]
        assert not mb["loss_mask"][:, t:].any() and not mb["tokens"][:, t:].any()  # past the batch's T: zeros
        assert torch.equal(mb["tokens"][:, :min(t, length)], batch["tokens"][rows, :min(t, length)])
        assert mb["advantages"].shape == (len(rows),)
    assert plan_micro_batches(lengths, 2048) != plan  # unpadded: other lengths


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_packed_rows_get_a_filler_sequence_to_the_fp8_multiple(recipe):
    m = token_multiple(recipe, 1, False)
    rng = random.Random(2)
    lengths = [rng.randint(3, 200) for _ in range(23)]
    batch = _odd_batch(lengths)
    plan = plan_packs(lengths, 1000, m)
    for rows, length in zip(plan.groups, plan.lengths):
        real = sum(lengths[i] for i in rows)
        assert length % m == 0 and real <= length < real + m and length <= 1000
        mb = pack_rows(batch, rows)
        tok, pos, cu = pad_packed(mb["packed_tokens"], mb["pack_positions"], mb["cu_seqlens"], m)
        assert tok.shape == pos.shape == (1, length)
        assert torch.equal(tok[:, :real], mb["packed_tokens"]) and not tok[:, real:].any()
        assert torch.equal(pos[0, real:], torch.arange(length - real))  # the filler's own positions
        if length > real:  # the filler is a sequence of its own: attention keeps it apart
            assert cu.tolist() == mb["cu_seqlens"].tolist() + [length]
        else:
            assert torch.equal(cu, mb["cu_seqlens"])
    assert plan.padded_tokens == sum(plan.lengths)


def test_padded_longest_row_must_fit_the_budget():
    plan_micro_batches([100], 128, 128)
    with pytest.raises(S2DError, match=r"longest sequence \(129 tokens, 256 once padded to a multiple of 128"):
        plan_micro_batches([129, 5], 200, 128)
    with pytest.raises(S2DError, match="once padded to a multiple of 16"):
        plan_packs([120], 127, 16)
    assert plan_packs([3, 4, 5], 127, 16).lengths == [16]  # bins of at most 112 real tokens, padded to 16
