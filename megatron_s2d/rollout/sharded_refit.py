"""Sharded refit: stream a live megatron model (any TP/PP layout) into colocated vLLM engines (any vLLM TP), one
tensor at a time, each vLLM rank receiving only what it needs.

    for hf_name, tensor in sharded_hf_state(model, arch, GenerationLayout(tp=2, ...)):
        ...   # vLLM's weight loaders narrow ``tensor`` to this rank's slice

Where the data comes from, per megatron tensor (all ranks iterate the same tensors in the same order: the stream is a
collective over the model's groups):

* pipeline parallelism: the stage that owns the tensor broadcasts *its TP shard* to the ranks of the other stages with
  the same TP rank (the model's PP group); every vLLM rank holds every layer, one tensor in flight at a time;
* vLLM TP == the model's TP (the usual case): rank r of vLLM's TP group holds the same heads / ffn / vocab slice as
  rank r of megatron's (both split contiguously by rank; vLLM's TP groups are contiguous ranks, as megatron's are), so
  the local shard is re-laid out locally (q/k/v from megatron's interleaved query groups, gate/up from fc1) and copied
  into its place in an uninitialised full-shape tensor, which vLLM's loader narrows back to exactly that slice: no
  gather, no full model anywhere. Vocab tensors take this path when vLLM's vocab padding (to a multiple of 64) gives
  the same slices as megatron's; otherwise they are gathered;
* vLLM TP != the model's TP (a re-split): the tensor is all-gathered over the model's TP group and handed over whole
  (vLLM narrows it to each rank's slice); the gather costs one tensor of memory at a time.
No rank ever holds more than one full tensor of the model (the largest is the embedding).

``verify=True`` (a debug/test option) also all-gathers every tensor and checks that the slice each vLLM rank is given
equals the same slice of the gathered tensor, naming the first one that differs (``InternalError``, raised on every
rank together at the end of the stream, so no rank is left waiting in a collective).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_s2d.errors import InternalError
from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.models.state_dict import GATE_UP, QKV, TensorMap, find_local_param, tensor_maps, to_hf, tp_merge

VLLM_VOCAB_PADDING = 64  # vllm.model_executor.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE


@dataclass(frozen=True)
class GenerationLayout:
    """vLLM's layout over the job's world (``distributed_executor_backend="external_launcher"``): replicas of ``tp``
    contiguous ranks, each an independent engine (vLLM's "external data parallelism"). The attributes mirror
    ``runtime.groups.ModelGroups`` so ``rollout.routed.RoutedEngine`` can route prompts over the replicas."""

    tp: int
    world: int
    rank: int

    @property
    def dp(self) -> int:  # replicas
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:  # this rank's replica
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def ranks_of_replica(self, replica: int) -> tuple[int, ...]:
        return tuple(range(replica * self.tp, (replica + 1) * self.tp))

    @property
    def replica_leader(self) -> int:
        return self.dp_rank * self.tp


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _shard_to_hf(m: TensorMap, arch: ArchSpec, shard: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """The HF tensors' slices held by one TP rank, from its megatron shard (a local re-layout, no communication)."""
    if m.tp_dim is None or tp == 1:
        return to_hf(m, arch, shard)
    if m.kind == GATE_UP:
        return list(torch.chunk(shard, 2, dim=0))
    if m.kind == QKV:
        local = dataclasses.replace(arch, num_attention_heads=arch.num_attention_heads // tp,
                                    num_kv_heads=arch.num_kv_heads // tp)
        g, hd, h = local.num_kv_heads, local.head_dim, local.hidden_size
        per = local.num_attention_heads // g
        q, k, v = torch.split(shard.reshape(g, (per + 2) * hd, h), [per * hd, hd, hd], dim=1)
        return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]
    return [shard]


def _vllm_vocab_slice(vocab: int, rank: int, tp: int) -> tuple[int, int]:
    """[start, end) of the original vocabulary a vLLM TP rank holds (VocabParallelEmbedding / ParallelLMHead)."""
    padded = -(-vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    per = padded // tp
    return rank * per, min(vocab, (rank + 1) * per)


def _local_ok(m: TensorMap, arch: ArchSpec, tp_model: int, tp_vllm: int) -> bool:
    """Whether every rank can hand vLLM its slice of ``m`` from its own shard (a pure function of shapes: all ranks
    decide the same)."""
    if tp_vllm != tp_model:
        return False
    if m.tp_dim is None or tp_model == 1:
        return True
    if m.ckpt_key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        per = arch.vocab_size // tp_model
        return all(_vllm_vocab_slice(arch.vocab_size, r, tp_vllm) == (r * per, (r + 1) * per) for r in range(tp_model))
    return True


def _embed(part: torch.Tensor, full_shape: tuple[int, ...], dim: int, rank: int) -> torch.Tensor:
    """An uninitialised ``full_shape`` tensor with ``part`` at TP rank ``rank``'s slice along ``dim``: what vLLM's
    weight loader narrows back to exactly ``part``."""
    full = torch.empty(full_shape, dtype=part.dtype, device=part.device)
    full.narrow(dim, rank * part.shape[dim], part.shape[dim]).copy_(part)
    return full


def sharded_hf_state(model, arch: ArchSpec, layout: GenerationLayout,
                     verify: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every HF tensor of ``model`` for this rank's vLLM engine (collective; see the
    module docstring). ``tensor`` is either the full tensor or a full-shape tensor valid only at this rank's slice."""
    m_ = _unwrap(model)
    tp_group, pp_group = m_.tp_group, m_.pp_group
    tp, pp = dist.get_world_size(tp_group), dist.get_world_size(pp_group)
    tp_rank, my_stage = dist.get_rank(tp_group), dist.get_rank(pp_group)
    if layout.tp == tp and layout.tp_rank != tp_rank:
        raise InternalError(f"vLLM TP rank {layout.tp_rank} != megatron TP rank {tp_rank} on rank {layout.rank}: "
                            "both TP groups should be the same contiguous ranks")
    pp_ranks = dist.get_process_group_ranks(pp_group)
    local_layers = {layer.layer_number - 1: layer for layer in m_.decoder.layers}
    per_stage: list = [None] * pp
    dist.all_gather_object(per_stage, sorted(local_layers), group=pp_group)
    owner_of = {i: s for s, layers in enumerate(per_stage) for i in layers}
    ref = next(m_.parameters())
    first_bad = None
    for m in tensor_maps(arch):
        owner = owner_of[m.layer] if m.layer is not None else (0 if m.ckpt_key.startswith("embedding.") else pp - 1)
        shard = None
        if owner == my_stage:
            module = local_layers[m.layer] if m.layer is not None else m_
            shard = find_local_param(module, m).detach()
        if pp > 1:
            shape = list(m.shape)
            if m.tp_dim is not None:
                shape[m.tp_dim] //= tp
            if shard is None:
                shard = torch.empty(shape, dtype=ref.dtype, device=ref.device)
            shard = shard.to(ref.dtype).contiguous()
            dist.broadcast(shard, src=pp_ranks[owner], group=pp_group)
        gathered = None
        if verify or not _local_ok(m, arch, tp, layout.tp):
            gathered = shard
            if tp > 1 and m.tp_dim is not None:
                parts = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(parts, shard.contiguous(), group=tp_group)
                gathered = tp_merge(m, parts)
            gathered = to_hf(m, arch, gathered)
        if _local_ok(m, arch, tp, layout.tp):
            pieces = _shard_to_hf(m, arch, shard, tp)
            if m.tp_dim is None or tp == 1:
                out = pieces
            else:
                out = [_embed(p, full_shape, m.tp_dim, tp_rank) for p, full_shape in zip(pieces, m.hf_shapes)]
            if verify:
                for name, given, want in zip(m.hf_names, out, gathered):
                    if m.tp_dim is None or tp == 1:
                        ok = torch.equal(given, want)
                    else:
                        n = want.shape[m.tp_dim] // tp
                        ok = torch.equal(given.narrow(m.tp_dim, tp_rank * n, n), want.narrow(m.tp_dim, tp_rank * n, n))
                    if not ok and first_bad is None:
                        first_bad = (f"the slice of {name} given to vLLM TP rank {layout.tp_rank} (global rank "
                                     f"{layout.rank}) differs from the trainer's tensor")
            yield from zip(m.hf_names, out)
        else:
            yield from zip(m.hf_names, gathered)
    if verify:  # raised on every rank together, after the stream (a rank failing alone would leave the rest waiting)
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, first_bad)
        bad = [f for f in found if f is not None]
        if bad:
            raise InternalError(f"sharded refit check: {bad[0]}" + (f" (and {len(bad) - 1} more ranks)"
                                                                     if len(bad) > 1 else ""))
