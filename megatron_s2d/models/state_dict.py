"""The state-dict adapter of the dense Llama family: the table that maps HF Llama-3.x / Qwen3 tensors onto
megatron-core ``GPTModel`` tensors and back (names, shapes, TP split/merge).

One table for both families, not one per family (torchtitan keeps a ``state_dict_adapter.py`` per model folder):
Qwen3 dense is Llama plus per-head q/k norms, which the table adds when ``arch.qk_norm``; what else differs per family
is its HF ``config.json`` (``llama.py``, ``qwen3.py``).

Everything that moves weights (offline conversion in both directions, loading HF weights into a live model, the
TP/PP-gathering export used by the vLLM refit) is driven by :func:`tensor_maps`, so a naming or layout fact lives in
exactly one place. Facts about megatron-core 0.16.1 encoded here (checked against a real model by
``tests/unit/convert/test_mapping.py``):

- ``linear_qkv.weight`` rows are interleaved per query group: for each group g, [the q heads of g, k_g, v_g]. Under
  TP each rank holds a contiguous block of whole groups, so the TP split is a plain split along dim 0.
- ``linear_fc1.weight`` is [gate; up]. Under TP each rank holds [gate_r; up_r] (NOT a contiguous block of the full
  tensor); megatron's SwiGLU sharded factory stores it in the dist checkpoint as the full [gate; up], in two chunks.
- HF uses the same rotate-half RoPE convention as megatron (``rotary_interleaved=False``): q/k need no permutation.
- The local layer spec stores its layer norms under Transformer-Engine key names in the dist checkpoint
  (``input_layernorm`` -> ``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm`` ->
  ``mlp.linear_fc1.layer_norm_weight``); per-layer tensors are stacked on a leading layer axis under one key.
- Tied embeddings (``tie_word_embeddings``): no ``output_layer.weight`` in the checkpoint and no ``lm_head.weight``
  in HF.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"

# Per-layer modules that carry a ``_extra_state`` ShardedObject in a local-spec dist checkpoint.
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
)
LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensor(s) it is made of."""

    ckpt_key: str  # dist-checkpoint key (TE names; per-layer tensors stacked under one key)
    layer: int | None  # global layer index (0-based), None for embedding / final norm / output layer
    hf_names: tuple[str, ...]
    kind: str  # COPY | QKV | GATE_UP
    tp_dim: int | None  # dimension split under tensor parallelism (None: replicated)
    local_names: tuple[str, ...]  # name in the live model, relative to its layer (or the model); local / TE spec
    shape: tuple[int, ...]  # full (TP=1) megatron shape
    hf_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Chunk:
    """A piece of one layer's tensor as stored in the dist checkpoint (offsets / sizes exclude the layer axis)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    hf_index: int | None  # GATE_UP: which HF tensor this chunk is (0 gate, 1 up); None: the whole tensor


def arch_diff(a: ArchSpec, b: ArchSpec) -> list[str]:
    """Fields where two architectures differ, as 'field: a vs b' strings (empty: identical)."""
    da, db = asdict(a), asdict(b)
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k]]


def _qkv_rows(arch: ArchSpec) -> int:
    return (arch.num_attention_heads + 2 * arch.num_kv_heads) * arch.head_dim


def layer_maps(arch: ArchSpec, i: int) -> list[TensorMap]:
    """The tensors of decoder layer ``i`` (global, 0-based), in HF order."""
    h, hd, ffn = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q_rows, kv_rows = arch.num_attention_heads * hd, arch.num_kv_heads * hd
    p = f"model.layers.{i}."
    k = LAYER_PREFIX
    maps = [
        TensorMap(k + "self_attention.linear_qkv.layer_norm_weight", i, (p + "input_layernorm.weight",), COPY, None,
                  ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"), (h,), ((h,),)),
        TensorMap(k + "self_attention.linear_qkv.weight", i,
                  (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                  QKV, 0, ("self_attention.linear_qkv.weight",), (_qkv_rows(arch), h),
                  ((q_rows, h), (kv_rows, h), (kv_rows, h))),
    ]
    if arch.qk_norm:
        maps += [
            TensorMap(k + "self_attention.q_layernorm.weight", i, (p + "self_attn.q_norm.weight",), COPY, None,
                      ("self_attention.q_layernorm.weight",), (hd,), ((hd,),)),
            TensorMap(k + "self_attention.k_layernorm.weight", i, (p + "self_attn.k_norm.weight",), COPY, None,
                      ("self_attention.k_layernorm.weight",), (hd,), ((hd,),)),
        ]
    maps += [
        TensorMap(k + "self_attention.linear_proj.weight", i, (p + "self_attn.o_proj.weight",), COPY, 1,
                  ("self_attention.linear_proj.weight",), (h, q_rows), ((h, q_rows),)),
        TensorMap(k + "mlp.linear_fc1.layer_norm_weight", i, (p + "post_attention_layernorm.weight",), COPY, None,
                  ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"), (h,), ((h,),)),
        TensorMap(k + "mlp.linear_fc1.weight", i, (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), GATE_UP, 0,
                  ("mlp.linear_fc1.weight",), (2 * ffn, h), ((ffn, h), (ffn, h))),
        TensorMap(k + "mlp.linear_fc2.weight", i, (p + "mlp.down_proj.weight",), COPY, 1,
                  ("mlp.linear_fc2.weight",), (h, ffn), ((h, ffn),)),
    ]
    return maps


def embedding_map(arch: ArchSpec) -> TensorMap:
    shape = (arch.vocab_size, arch.hidden_size)
    return TensorMap("embedding.word_embeddings.weight", None, ("model.embed_tokens.weight",), COPY, 0,
                     ("embedding.word_embeddings.weight",), shape, (shape,))


def final_maps(arch: ArchSpec) -> list[TensorMap]:
    """Final norm and (untied) output layer: what the last pipeline stage owns besides its layers."""
    h = arch.hidden_size
    maps = [TensorMap("decoder.final_layernorm.weight", None, ("model.norm.weight",), COPY, None,
                      ("decoder.final_layernorm.weight",), (h,), ((h,),))]
    if not arch.tie_word_embeddings:
        shape = (arch.vocab_size, h)
        maps.append(TensorMap("output_layer.weight", None, ("lm_head.weight",), COPY, 0, ("output_layer.weight",),
                              shape, (shape,)))
    return maps


def tensor_maps(arch: ArchSpec) -> list[TensorMap]:
    """Every tensor of the model, in HF order (embedding, layers 0..L-1, final norm, lm_head)."""
    maps = [embedding_map(arch)]
    for i in range(arch.num_layers):
        maps += layer_maps(arch, i)
    return maps + final_maps(arch)


def hf_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor the HF checkpoint must contain."""
    return {n: s for m in tensor_maps(arch) for n, s in zip(m.hf_names, m.hf_shapes)}


def ckpt_global_shape(m: TensorMap, num_layers: int) -> tuple[int, ...]:
    return ((num_layers,) if m.layer is not None else ()) + m.shape


# ---------------------------------------------------------------- full-tensor transforms (TP=1 megatron <-> HF)
def _check_shapes(names: Sequence[str], tensors: Sequence[torch.Tensor], shapes) -> None:
    for name, t, want in zip(names, tensors, shapes):
        if tuple(t.shape) != tuple(want):
            raise S2DError(f"tensor '{name}': expected shape {tuple(want)}, got {tuple(t.shape)}")


def to_megatron(m: TensorMap, arch: ArchSpec, hf: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) megatron tensor of ``m`` from its HF tensors."""
    _check_shapes(m.hf_names, hf, m.hf_shapes)
    if m.kind == COPY:
        return hf[0]
    if m.kind == GATE_UP:
        return torch.cat([hf[0], hf[1]], dim=0)
    q, k, v = hf
    g, hd, h = arch.num_kv_heads, arch.head_dim, arch.hidden_size
    per = arch.num_attention_heads // g
    return torch.cat([q.reshape(g, per * hd, h), k.reshape(g, hd, h), v.reshape(g, hd, h)], dim=1).reshape(-1, h)


def to_hf(m: TensorMap, arch: ArchSpec, t: torch.Tensor) -> list[torch.Tensor]:
    """The HF tensors of ``m`` from the full (TP=1) megatron tensor (views where possible)."""
    _check_shapes([m.ckpt_key], [t], [m.shape])
    if m.kind == COPY:
        return [t]
    if m.kind == GATE_UP:
        return list(torch.chunk(t, 2, dim=0))
    g, hd, h = arch.num_kv_heads, arch.head_dim, arch.hidden_size
    per = arch.num_attention_heads // g
    q, k, v = torch.split(t.reshape(g, (per + 2) * hd, h), [per * hd, hd, hd], dim=1)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


def ckpt_chunks(m: TensorMap) -> list[Chunk]:
    """How the TP=1 layout stores ``m`` in a dist checkpoint (one chunk per tensor; two for the SwiGLU fc1)."""
    if m.kind == GATE_UP:
        half = m.shape[0] // 2
        return [Chunk((0, 0), (half, m.shape[1]), 0), Chunk((half, 0), (half, m.shape[1]), 1)]
    return [Chunk((0,) * len(m.shape), m.shape, None)]


def chunk_from_hf(m: TensorMap, arch: ArchSpec, chunk: Chunk, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The data of one stored chunk, reading only the HF tensors it needs."""
    if chunk.hf_index is not None:
        name = m.hf_names[chunk.hf_index]
        t = read(name)
        _check_shapes([name], [t], [m.hf_shapes[chunk.hf_index]])
        return t
    return to_megatron(m, arch, [read(n) for n in m.hf_names])


# ---------------------------------------------------------------- tensor parallelism of live models
def tp_split(m: TensorMap, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's local shard of the full megatron tensor."""
    if m.tp_dim is None or size == 1:
        return full
    if m.kind == GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    return torch.chunk(full, size, dim=m.tp_dim)[rank]


def tp_merge(m: TensorMap, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full megatron tensor from all TP ranks' shards (inverse of :func:`tp_split`)."""
    if m.tp_dim is None or len(parts) == 1:
        return parts[0]
    if m.kind == GATE_UP:
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(parts), dim=m.tp_dim)


def find_local_param(module: torch.nn.Module, m: TensorMap) -> torch.nn.Parameter:
    """The live parameter for ``m`` in ``module`` (a decoder layer for layer maps, the GPTModel otherwise)."""
    params = dict(module.named_parameters())
    for name in m.local_names:
        if name in params:
            return params[name]
    raise S2DError(f"model has no parameter {' or '.join(m.local_names)} (for checkpoint key '{m.ckpt_key}')")
