"""Read and write megatron-core ``torch_dist`` dist checkpoints directly, without a process group or a model.

Why not ``dist_checkpointing.save``: its writer (``FileSystemWriterAsync``) stages every tensor in memory before
writing, i.e. the whole model. Here the checkpoint is written through torch DCP's plain ``FileSystemWriter``, which
resolves items one at a time: the state dict holds *meta* placeholders, and the planner's ``resolve_data``
materialises each chunk (from the HF safetensors) only when the writer asks for it. Memory is one tensor.

The layout written is what megatron-core 0.16.1 writes for a TP=1/PP=1 ``GPTModel`` with the local spec: the same
keys, global shapes, per-layer chunks on a stacked layer axis, the SwiGLU fc1 in two chunks, ``_extra_state``
ShardedObjects, an empty ``common.pt`` and a ``metadata.json`` naming the ``torch_dist`` backend
(``tests/unit/convert/test_mapping.py`` compares it with a real model's sharded state dict). A dist checkpoint is
layout-agnostic: ``dist_checkpointing.load`` reads it at any TP/PP.

:class:`DistCheckpointReader` loads chosen tensors of one layer at the TP=1 shape, from a checkpoint written at any
layout, for streaming megatron -> HF conversion one layer at a time.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_s2d.models.state_dict import EXTRA_STATE_MODULES, LAYER_PREFIX, Chunk, TensorMap, ckpt_chunks, \
    ckpt_global_shape
from megatron_s2d.errors import S2DError


def _wrap(key: str, data: torch.Tensor, global_shape: Sequence[int], global_offset: Sequence[int]):
    """A megatron ShardedTensor (one chunk) wrapped as a DCP-checkpointable tensor."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.checkpointable import CheckpointableShardedTensor

    sh = ShardedTensor(key, data, data.dtype, tuple(data.shape), tuple(global_shape), tuple(global_offset), None,
                       replica_id=0)
    return CheckpointableShardedTensor.from_sh_ten(sh)


def _group(chunks: list):
    from megatron.core.dist_checkpointing.strategies.checkpointable import LocalShardsContainer

    return chunks[0] if len(chunks) == 1 else LocalShardsContainer(chunks)


def _extra_state_blob() -> io.BytesIO:
    """What megatron stores for a local-spec linear layer's (empty) extra state: a pickled ``[None]``."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


def extra_state_keys(num_layers: int) -> list[str]:
    """Unique keys of the per-layer ``_extra_state`` ShardedObjects (``<key>/shard_<layer>_<num_layers>``)."""
    return [f"{LAYER_PREFIX}{mod}._extra_state/shard_{i}_{num_layers}"
            for mod in EXTRA_STATE_MODULES for i in range(num_layers)]


def build_save_state_dict(maps: Sequence[TensorMap], num_layers: int, dtype: torch.dtype):
    """(DCP state dict of meta placeholders, {(key, global offsets): (map, chunk)}) for the TP=1/PP=1 layout."""
    per_key: dict[str, list] = {}
    where: dict[tuple[str, tuple[int, ...]], tuple[TensorMap, Chunk]] = {}
    for m in maps:
        full = ckpt_global_shape(m, num_layers)
        for c in ckpt_chunks(m):
            lead = (m.layer,) if m.layer is not None else ()
            sizes = ((1,) if m.layer is not None else ()) + c.sizes
            data = torch.empty(sizes, dtype=dtype, device="meta")
            per_key.setdefault(m.ckpt_key, []).append(_wrap(m.ckpt_key, data, full, lead + c.offsets))
            where[(m.ckpt_key, lead + c.offsets)] = (m, c)
    state = {k: _group(v) for k, v in per_key.items()}
    for k in extra_state_keys(num_layers):
        state[k] = _extra_state_blob()
    return state, where


def _make_planner(produce: Callable, order: Callable):
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(DefaultSavePlanner):
        """Materialises each tensor chunk only when the writer asks for it; writes in ``order``."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            plan.items.sort(key=order)
            return plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return produce(write_item)

        def transform_object(self, write_item, object):
            return object  # ShardedObject blobs are already serialised (as megatron's MCoreSavePlanner does)

    return LazySavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def write_dist_checkpoint(out_dir: Path, maps: Sequence[TensorMap], num_layers: int, dtype: torch.dtype,
                          produce: Callable[[TensorMap, Chunk], torch.Tensor]) -> int:
    """Write a TP=1/PP=1-chunked megatron dist checkpoint to ``out_dir``; ``produce(map, chunk)`` gives each chunk's
    data (without the layer axis). Returns the number of tensor bytes written."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    state, where = build_save_state_dict(maps, num_layers, dtype)
    position = {k: n for n, k in enumerate(where)}  # HF order: embedding, layer 0, ..., final norm, output
    done = {"items": 0, "bytes": 0}
    errors: list[BaseException] = []  # DCP wraps exceptions from resolve_data; re-raise the original

    def order(item):
        if item.index.offset is None:  # ShardedObjects (bytes) first
            return (-1, item.index.fqn)
        return (position[(item.index.fqn, tuple(item.index.offset))], "")

    def resolve(item):
        key, offsets = item.index.fqn, tuple(item.index.offset)
        m, chunk = where[(key, offsets)]
        try:
            t = produce(m, chunk).to(dtype)
        except BaseException as e:
            errors.append(e)
            raise
        want = tuple(item.tensor_data.chunk.sizes)
        t = t.reshape(want).contiguous()
        done["items"] += 1
        done["bytes"] += t.nbytes
        return t

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    try:
        with warnings.catch_warnings():  # "torch.distributed ... uninitialized, assuming ... a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=writer, planner=_make_planner(resolve, order), no_dist=True)
    except BaseException:  # DCP's CheckpointException derives from BaseException
        if errors:
            raise errors[0] from None
        raise
    if done["items"] != len(where):
        raise RuntimeError(f"dist checkpoint writer resolved {done['items']} of {len(where)} chunks")
    torch.save({}, out_dir / COMMON_STATE_FNAME)
    save_config(CheckpointingConfig("torch_dist", 1), str(out_dir))
    return done["bytes"]


class DistCheckpointReader:
    """Reads full (TP=1) tensors, one group at a time, from a megatron ``torch_dist`` checkpoint of any layout."""

    def __init__(self, weights_dir: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(weights_dir)
        if not (self.dir / ".metadata").is_file():
            raise S2DError(f"{self.dir}: not a torch_dist dist checkpoint (no .metadata file)")
        md = FileSystemReader(str(self.dir)).read_metadata()
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def check(self, maps: Sequence[TensorMap], num_layers: int) -> None:
        """Refuse (naming them) missing keys and global-shape mismatches, before anything is read or written."""
        missing, wrong = [], []
        for m in maps:
            md = self.tensors.get(m.ckpt_key)
            want = ckpt_global_shape(m, num_layers)
            if md is None:
                missing.append(m.ckpt_key)
            elif tuple(md.size) != want:
                wrong.append(f"{m.ckpt_key}: expected {want}, got {tuple(md.size)}")
        if missing:
            raise S2DError(f"{self.dir}: checkpoint lacks tensors {sorted(set(missing))}")
        if wrong:
            raise S2DError(f"{self.dir}: tensor shape mismatch: {'; '.join(sorted(set(wrong)))}")

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, maps: Sequence[TensorMap], num_layers: int) -> list[torch.Tensor]:
        """The full TP=1 megatron tensors of ``maps`` (at most one map per key), in the stored dtype."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

        state, out = {}, []
        for m in maps:
            if m.ckpt_key in state:
                raise ValueError(f"DistCheckpointReader.read: key {m.ckpt_key} requested twice in one group")
            buf = torch.empty(m.shape, dtype=self.dtype(m.ckpt_key))
            if m.layer is not None:
                sh = _wrap(m.ckpt_key, buf.view((1,) + m.shape), ckpt_global_shape(m, num_layers),
                           (m.layer,) + (0,) * len(m.shape))
            else:
                sh = _wrap(m.ckpt_key, buf, m.shape, (0,) * len(m.shape))
            state[m.ckpt_key] = sh
            out.append(buf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=FileSystemReader(str(self.dir)),
                     planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
        return out
