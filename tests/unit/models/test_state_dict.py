"""The mapping table: q/k/v interleaving, SwiGLU gate/up, TP split/merge, and that the dist-checkpoint layout we
write by hand is exactly what megatron-core's own TP1/PP1 GPTModel produces (keys, global shapes, chunks, objects)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2d.checkpoint.dcp_io import build_save_state_dict, extra_state_keys
from megatron_s2d.models.state_dict import (GATE_UP, QKV, ckpt_chunks, find_local_param, layer_maps, tensor_maps,
                                         to_hf, to_megatron, tp_merge, tp_split)
from megatron_s2d.models.arch import arch_from_hf_config
from tests.unit.convert._tiny import hf_config


def _arch(kind):
    return arch_from_hf_config(hf_config(kind).to_dict())


def test_qkv_interleaves_per_query_group():
    arch = _arch("qwen3_untied")  # 4 q heads, 2 kv groups, head_dim 32, hidden 64
    hd, h = arch.head_dim, arch.hidden_size
    qkv = next(m for m in layer_maps(arch, 0) if m.kind == QKV)
    # each head's rows hold a distinct constant: q heads 0..3, k heads 10..11, v heads 20..21
    q = torch.arange(4).repeat_interleave(hd)[:, None].float().expand(-1, h)
    k = (10 + torch.arange(2)).repeat_interleave(hd)[:, None].float().expand(-1, h)
    v = (20 + torch.arange(2)).repeat_interleave(hd)[:, None].float().expand(-1, h)
    fused = to_megatron(qkv, arch, [q, k, v])
    heads = fused[::hd, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]  # [q heads of group g, k_g, v_g] for g = 0, 1
    back = to_hf(qkv, arch, fused)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


@pytest.mark.parametrize("kind", ["llama", "qwen3_tied"])
def test_tp_split_merge_roundtrip_and_gate_up_layout(kind):
    arch = _arch(kind)
    g = torch.Generator().manual_seed(0)
    for m in tensor_maps(arch):
        full = torch.randn(m.shape, generator=g)
        parts = [tp_split(m, full, r, 2) for r in range(2)]
        assert torch.equal(tp_merge(m, parts), full), m.ckpt_key
        if m.kind == GATE_UP:  # each rank holds [gate_r; up_r]
            gate, up = full.chunk(2)
            assert torch.equal(parts[1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
            assert [c.hf_index for c in ckpt_chunks(m)] == [0, 1]
        hf = [torch.randn(s, generator=g) for s in m.hf_shapes]
        assert all(torch.equal(a, b) for a, b in zip(to_hf(m, arch, to_megatron(m, arch, hf)), hf))


def _megatron_layout(model):
    """(tensor key -> (global shape, sorted chunk offsets)), object unique keys) of a model's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    tensors, objects = {}, set()
    for v in nested_values(sd):
        if isinstance(v, ShardedObject):
            objects.add(v.unique_key)
        elif isinstance(v, ShardedTensor) and v.replica_id in (0, (0, 0, 0)):
            shape, offs = tensors.setdefault(v.key, (tuple(v.global_shape), []))
            offs.append((tuple(v.global_offset), (1,) * v.prepend_axis_num + tuple(v.data.shape)))
    return {k: (s, sorted(o)) for k, (s, o) in tensors.items()}, objects


def _our_layout(arch):
    from megatron.core.dist_checkpointing.strategies.checkpointable import LocalShardsContainer

    state, _ = build_save_state_dict(tensor_maps(arch), arch.num_layers, torch.float32)
    tensors = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            shards = v._local_shards if isinstance(v, LocalShardsContainer) else [v]
            tensors[k] = (tuple(shards[0]._sh_ten.global_shape),
                          sorted((tuple(s._sh_ten.global_offset), tuple(s._sh_ten.data.shape)) for s in shards))
    return tensors, {k for k, v in state.items() if not isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("kind", ["llama", "qwen3_tied", "qwen3_untied"])
def test_handwritten_layout_matches_megatron_model(kind):
    from megatron.core.models.gpt import GPTModel

    from megatron_s2d.models.build import ModelOptions, layer_spec, transformer_config
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = _arch(kind)
    config = dataclasses.replace(transformer_config(arch, ModelOptions(), 1, 1), perform_initialization=False,
                                 use_cpu_initialization=True)
    with torch.device("meta"):
        model = GPTModel(config=config, transformer_layer_spec=layer_spec(arch, False), vocab_size=arch.vocab_size,
                         max_sequence_length=arch.max_position_embeddings,
                         share_embeddings_and_output_weights=arch.tie_word_embeddings,
                         position_embedding_type="rope")
    want_tensors, want_objects = _megatron_layout(model)
    got_tensors, got_objects = _our_layout(arch)
    assert got_tensors == want_tensors
    assert got_objects == want_objects == set(extra_state_keys(arch.num_layers))
    # and every map finds its live parameter (local spec names)
    for m in tensor_maps(arch):
        owner = model.decoder.layers[m.layer] if m.layer is not None else model
        assert tuple(find_local_param(owner, m).shape) == m.shape
