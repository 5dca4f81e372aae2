import random

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.policy.batching import block_causal_mask, pack_rows, plan_micro_batches, plan_packs, slice_batch
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


def test_packing_with_fp8_is_refused_before_building():
    from megatron_s2d.config import ModelConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy.megatron_policy import MegatronPolicy

    arch = arch_from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(S2DError, match="pack_sequences with model.fp8"):
        MegatronPolicy(arch, ModelConfig(dtype="fp32", pack_sequences=True, fp8="delayed"))
