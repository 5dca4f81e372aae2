"""The trainer -> generator transfer plan (rollout/weight_transfer.py), without processes: the TP ranges against
state_dict.tp_split, and a transfer simulated piece by piece from the trainers' shards into the generators' that must
rebuild exactly the generators' tp_split shards, each row written once, within the bucket bound."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from megatron_s2d.models import arch_from_hf_config
from megatron_s2d.models.state_dict import tensor_maps, tp_split
from megatron_s2d.rollout.weight_transfer import SideLayout, checksum, local_shape, plan_transfer, tp_ranges

CFG = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=4, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
           max_position_embeddings=64)


def _arch(tied=False):
    return arch_from_hf_config({**CFG, "tie_word_embeddings": tied})


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_ranges_rebuild_megatron_shards(tp):
    """Concatenating a rank's full-tensor ranges gives tp_split's shard: fc1's per-rank [gate_r; up_r] interleave,
    qkv's whole query groups, the row/column splits, replicated norms."""
    g = torch.Generator().manual_seed(0)
    for m in tensor_maps(_arch()):
        full = torch.randn(m.shape, generator=g)
        dim = 0 if m.tp_dim is None else m.tp_dim
        for r in range(tp):
            ranges = tp_ranges(m, tp, r)
            assert [ls for _, ls, _ in ranges] == [sum(n for _, _, n in ranges[:i]) for i in range(len(ranges))]
            rebuilt = torch.cat([full.narrow(dim, fs, n) for fs, _, n in ranges], dim=dim)
            assert torch.equal(rebuilt, tp_split(m, full, r, tp)), (m.ckpt_key, tp, r)
            assert tuple(rebuilt.shape) == local_shape(m, tp)


def _simulate(arch, trainer: SideLayout, generator: SideLayout, bucket_bytes: int, elem_bytes: int = 4):
    """Run the plan on tensors: every trainer rank holds its tp_split shards; returns the plan and the generator
    replica-0 shards it filled, with how often each element was written."""
    plan = plan_transfer(arch, trainer, generator, bucket_bytes, elem_bytes)
    g = torch.Generator().manual_seed(1)
    full = {k: torch.randn(s.m.shape, generator=g) for k, s in enumerate(plan.slots) if not s.tied_copy}
    tied = [k for k, s in enumerate(plan.slots) if s.tied_copy]
    for k in tied:  # the copy carries the embedding's values
        full[k] = full[next(j for j, s in enumerate(plan.slots) if s.m.ckpt_key == plan.slots[k].m.ckpt_key)]
    got, writes = {}, {}
    for b, bucket in enumerate(plan.buckets):
        sent, received = defaultdict(int), defaultdict(int)
        for i in bucket:
            p = plan.pieces[i]
            slot = plan.slots[p.slot]
            s_tp, s_dp, s_pp = trainer.coords(p.src)
            d_tp, d_dp, d_pp = generator.coords(p.dst)
            assert (s_pp, d_pp, d_dp) == (slot.src_stage, slot.dst_stage, 0), "only replica 0 of the owning stage"
            src = tp_split(slot.m, full[p.slot], s_tp, trainer.tp)
            key = (p.dst, p.slot)
            if key not in got:
                got[key] = torch.full(local_shape(slot.m, generator.tp), float("nan"))
                writes[key] = torch.zeros(local_shape(slot.m, generator.tp), dtype=torch.int64)
            got[key].narrow(p.dim, p.dst_start, p.length).copy_(src.narrow(p.dim, p.src_start, p.length))
            writes[key].narrow(p.dim, p.dst_start, p.length).add_(1)
            sent[p.src] += p.numel * elem_bytes
            received[p.dst] += p.numel * elem_bytes
        row_bytes = max(plan.pieces[i].numel // plan.pieces[i].length for i in bucket) * elem_bytes
        assert max(max(sent.values()), max(received.values())) <= max(bucket_bytes, row_bytes), f"bucket {b}"
    for (dst, k), t in got.items():
        slot = plan.slots[k]
        d_tp = generator.coords(dst)[0]
        assert torch.equal(t, tp_split(slot.m, full[k], d_tp, generator.tp)), (slot.name, dst)
        assert bool((writes[dst, k] == 1).all()), f"{slot.name} on generator {dst}: a row written twice or never"
    expected = {(generator.rank(t, 0, s.dst_stage), k) for k, s in enumerate(plan.slots) for t in range(generator.tp)}
    assert set(got) == expected  # every generator shard of replica 0 is filled
    return plan


LAYOUTS = [  # (trainer tp, pp, world), (generator tp, pp, world)
    ((2, 1, 2), (1, 1, 2)),   # TP2 -> TP1, two generator replicas
    ((1, 1, 2), (2, 1, 2)),   # TP1 x DP2 -> TP2
    ((4, 1, 4), (2, 1, 2)),   # a finer TP into a coarser one
    ((2, 1, 4), (4, 1, 4)),   # TP2 x DP2 -> TP4
    ((1, 2, 2), (1, 1, 2)),   # PP2 -> PP1
    ((2, 2, 4), (1, 4, 8)),   # TP2 x PP2 -> PP4 x DP2
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("trainer,generator", LAYOUTS)
def test_simulated_transfer_rebuilds_generator_shards(trainer, generator, tied):
    plan = _simulate(_arch(tied), SideLayout(*trainer), SideLayout(*generator), bucket_bytes=1024)
    assert len(plan.buckets) > 1
    t = SideLayout(*trainer)
    if t.dp > 1:  # the sends are spread over the trainer replicas
        assert {t.coords(p.src)[1] for p in plan.pieces} == set(range(t.dp))
    # nothing is sent twice: the generators' replica-0 shards, once
    total = sum(p.numel for p in plan.pieces)
    want = sum(torch.Size(local_shape(s.m, generator[0])).numel() * generator[0] for s in plan.slots)
    assert total == want


def test_tied_embedding_reaches_the_last_generator_stage():
    plan = _simulate(_arch(tied=True), SideLayout(2, 1, 2), SideLayout(1, 2, 2), bucket_bytes=1 << 20)
    copies = [s for s in plan.slots if s.tied_copy]
    assert len(copies) == 1 and (copies[0].src_stage, copies[0].dst_stage) == (0, 1)
    untied = plan_transfer(_arch(tied=True), SideLayout(2, 1, 2), SideLayout(1, 1, 2), 1 << 20, 4)
    assert not any(s.tied_copy for s in untied.slots)  # one stage: the output layer is the embedding itself


def test_a_bucket_smaller_than_a_row_sends_one_row_at_a_time():
    plan = _simulate(_arch(), SideLayout(2, 1, 2), SideLayout(1, 1, 2), bucket_bytes=8)
    assert all(p.length == 1 or p.numel * 4 <= 8 for p in plan.pieces)  # 1-D norms: two elements fit
    assert all(len({plan.pieces[i].src for i in b}) == len(b) for b in plan.buckets)  # one piece per sender


def test_big_bucket_is_one_bucket_and_fused_layouts_are_cut_in_two():
    plan = plan_transfer(_arch(), SideLayout(2, 1, 2), SideLayout(1, 1, 2), 1 << 30, 4)
    assert len(plan.buckets) == 1
    fc1 = [p for p in plan.pieces if plan.slots[p.slot].name == "decoder.layers.0.mlp.linear_fc1.weight"]
    # [gate_0; up_0] and [gate_1; up_1] into [gate; up]: four pieces, the up halves after all the gates
    assert sorted((p.src, p.full_start, p.dst_start, p.length) for p in fc1) == [
        (0, 0, 0, 32), (0, 64, 64, 32), (1, 32, 32, 32), (1, 96, 96, 32)]


def test_checksum_sees_a_moved_element():
    t = torch.arange(12, dtype=torch.float32)
    assert checksum(t) == checksum(t.clone())
    assert checksum(t) != checksum(t.flip(0))
    assert checksum(t.to(torch.bfloat16)) != checksum(t.flip(0).to(torch.bfloat16))
    u = t.clone()
    u[5] = 5.0000005
    assert checksum(t) != checksum(u)
