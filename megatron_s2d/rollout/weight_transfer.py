"""M-to-N weight transfer over the bridge of a split world (``rollout.placement: separate``): the trainers' megatron
shards (layout tp_t x pp_t x dp_t over the T trainer ranks) into the generators' megatron GPTModel (tp_g x pp_g x
dp_g over the N generator ranks), re-laid out on the way.

    xfer = WeightTransfer(bridge, arch, trainer=SideLayout(tp=2, pp=1, world=T),
                          generator=SideLayout(tp=1, pp=1, world=N), bucket_bytes=64 << 20)
    metrics = xfer.run(model, version=v)   # every rank of both sides; trainers send, generators receive
    xfer.version                           # the version this rank's model holds (generators) / last sent (trainers)

How (all of it is a pure :func:`plan_transfer` of the arch and the two layouts, the same on every rank):

* Each megatron tensor is described in *full-tensor* coordinates along the dimension TP splits (``state_dict``'s
  table): a TP rank holds one contiguous range of it, two for ``linear_fc1`` ([gate_r; up_r], megatron's per-rank
  interleave; ``linear_qkv`` is one range: its query groups are whole per rank). :func:`tp_ranges` is that layout,
  tested against ``state_dict.tp_split``. A *piece* is the overlap of a trainer shard's range with a generator
  shard's range: exactly the rows that trainer rank sends to that generator rank, nothing gathered, no rank ever
  holding more than its own shards plus one bucket.
* Each trainer shard is sent once, to generator replica 0 only; the tensors are spread over the trainer DP replicas
  (tensor k comes from replica k mod dp_t; replicated tensors, the norms, from TP rank k mod tp_t). Generator
  replicas 1.. get each bucket from their replica-0 peer by a broadcast over the generator side's DP group.
* Pieces are cut to ``bucket_bytes`` and grouped into buckets in which no rank sends, or receives, more than
  ``bucket_bytes`` (a single row larger than that travels alone). One message per (trainer, generator) pair per
  bucket: a flat buffer of its pieces.
* PP: each piece goes from the stage that owns the layer on the trainer side to the stage that owns it on the
  generator side (megatron's even split: layer i on stage i // (L / pp); megatron-core 0.16.1
  transformer/transformer_layer.py:164, 184); with tied embeddings and pp_g > 1 the generator's last stage gets the
  embedding into its ``output_layer.weight`` copy too.
* Versioned: trainer global rank 0 first sends a header (version, dtype, both layouts, the arch) to every generator;
  each checks it against its own and records the version once every rank finished (``Bridge.finish``: every rank
  returns, or every rank raises; a silent rank is a ``BridgeTimeout`` naming it).
* ``verify=True``: every piece travels with a position-weighted checksum of its raw bits; a generator checks each
  received piece, and that its parameter slice equals the piece after the copy, naming the parameter, its rows and
  the sending rank (``InternalError`` on every rank).

The payload goes over the bridge's gloo group (CPU buffers; GPU parameters are staged through them): see
``runtime.bridge`` on NCCL. The generator-side DP broadcast uses the side's own backend.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_s2d.errors import InternalError
from megatron_s2d.models.arch import ArchSpec, check_layout
from megatron_s2d.models.state_dict import (GATE_UP, TensorMap, arch_diff, embedding_map, find_local_param,
                                            tensor_maps)
from megatron_s2d.runtime.bridge import GENERATE, Bridge, Pending
from megatron_s2d.runtime.groups import rank_of

_DATA_TAG, _SUM_TAG = 2, 3


@dataclass(frozen=True)
class SideLayout:
    """A model's layout over one side's world, in megatron's rank order (``runtime.groups``: tp fastest, then dp,
    pp outermost)."""

    tp: int
    pp: int
    world: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of side rank ``rank``."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return rank_of(tp_rank, dp_rank, pp_rank, self.tp, self.dp)


@dataclass(frozen=True)
class Slot:
    """One tensor the generators receive: a megatron tensor at its owning stage on each side."""

    m: TensorMap
    name: str  # for messages: the live parameter name on the generator side
    src_stage: int
    dst_stage: int
    tied_copy: bool  # the generator's last-stage output_layer.weight, a copy of the tied embedding


@dataclass(frozen=True)
class Piece:
    """Rows ``full_start .. full_start + length`` (along ``dim``) of slot ``slot``, from trainer side rank ``src`` to
    generator side rank ``dst`` (replica 0), at ``src_start`` / ``dst_start`` in their local shards."""

    slot: int
    src: int
    dst: int
    dim: int
    src_start: int
    dst_start: int
    length: int
    full_start: int
    numel: int


@dataclass(frozen=True)
class TransferPlan:
    slots: tuple[Slot, ...]
    pieces: tuple[Piece, ...]
    buckets: tuple[tuple[int, ...], ...]  # piece indices, in order; a (src, dst) message lists its pieces in order

    def messages(self, bucket: int) -> dict[tuple[int, int], list[Piece]]:
        """(src, dst) -> the pieces of bucket ``bucket`` from trainer ``src`` to generator ``dst``."""
        out: dict[tuple[int, int], list[Piece]] = defaultdict(list)
        for i in self.buckets[bucket]:
            p = self.pieces[i]
            out[(p.src, p.dst)].append(p)
        return out


def split_dim(m: TensorMap) -> int:
    """The dimension pieces of ``m`` run along: the TP split dimension (0 for replicated tensors)."""
    return 0 if m.tp_dim is None else m.tp_dim


def tp_ranges(m: TensorMap, tp: int, tp_rank: int) -> list[tuple[int, int, int]]:
    """``(full_start, local_start, length)`` along :func:`split_dim`: the rows of the full megatron tensor ``m`` that
    TP rank ``tp_rank`` of ``tp`` holds, and where they sit in its shard (``state_dict.tp_split``'s layout: the tensor
    is one block, [gate; up] two, each split contiguously over the ranks; replicated tensors are whole everywhere)."""
    n = m.shape[split_dim(m)]
    if m.tp_dim is None or tp == 1:
        return [(0, 0, n)]
    blocks = 2 if m.kind == GATE_UP else 1
    block = n // blocks
    per = block // tp
    return [(b * block + tp_rank * per, b * per, per) for b in range(blocks)]


def local_shape(m: TensorMap, tp: int) -> tuple[int, ...]:
    shape = list(m.shape)
    shape[split_dim(m)] = sum(n for _, _, n in tp_ranges(m, tp, 0))
    return tuple(shape)


def stage_of(layer: int, num_layers: int, pp: int) -> int:
    """The pipeline stage holding global layer ``layer`` (megatron's even split)."""
    return layer // (num_layers // pp)


def plan_transfer(arch: ArchSpec, trainer: SideLayout, generator: SideLayout, bucket_bytes: int,
                  elem_bytes: int) -> TransferPlan:
    """Which rows every trainer rank sends to which generator rank, in which bucket (see the module docstring)."""
    check_layout(arch, trainer.tp, trainer.pp, "trainer layout")
    check_layout(arch, generator.tp, generator.pp, "generation layout")
    for name, side in (("trainer", trainer), ("generator", generator)):
        if side.world % (side.tp * side.pp):
            raise InternalError(f"{name} layout tp={side.tp} x pp={side.pp} does not divide its {side.world} ranks")
    slots: list[Slot] = []
    for m in tensor_maps(arch):
        if m.layer is not None:
            stages = stage_of(m.layer, arch.num_layers, trainer.pp), stage_of(m.layer, arch.num_layers, generator.pp)
            name = f"decoder.layers.{m.layer}.{m.local_names[0]}"
        elif m.ckpt_key.startswith("embedding."):
            stages, name = (0, 0), m.ckpt_key
        else:
            stages, name = (trainer.pp - 1, generator.pp - 1), m.ckpt_key
        slots.append(Slot(m, name, *stages, tied_copy=False))
    if arch.tie_word_embeddings and generator.pp > 1:
        slots.append(Slot(embedding_map(arch), "output_layer.weight (the tied embedding's last-stage copy)", 0,
                          generator.pp - 1, tied_copy=True))
    per_src: dict[int, list[Piece]] = defaultdict(list)
    for k, slot in enumerate(slots):
        m, dim = slot.m, split_dim(slot.m)
        row = math.prod(s for d, s in enumerate(m.shape) if d != dim)
        max_rows = max(1, bucket_bytes // (row * elem_bytes))
        src_tps = range(trainer.tp) if m.tp_dim is not None else [k % trainer.tp]
        for dst_tp in range(generator.tp):
            dst = generator.rank(dst_tp, 0, slot.dst_stage)
            for fd, ld, nd in tp_ranges(m, generator.tp, dst_tp):
                for src_tp in src_tps:
                    src = trainer.rank(src_tp, k % trainer.dp, slot.src_stage)
                    for fs, ls, ns in tp_ranges(m, trainer.tp, src_tp):
                        lo, hi = max(fs, fd), min(fs + ns, fd + nd)
                        for c in range(lo, hi, max_rows):
                            n = min(max_rows, hi - c)
                            per_src[src].append(Piece(k, src, dst, dim, ls + c - fs, ld + c - fd, n, c, n * row))
    # interleave the senders (each keeps its order) so that a bucket keeps every sender busy
    queues = [per_src[s] for s in sorted(per_src)]
    pieces = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    buckets, cur, load = [], [], defaultdict(int)
    for i, p in enumerate(pieces):
        nbytes = p.numel * elem_bytes
        if cur and max(load["s", p.src], load["d", p.dst]) + nbytes > bucket_bytes:
            buckets.append(tuple(cur))
            cur, load = [], defaultdict(int)
        cur.append(i)
        load["s", p.src] += nbytes
        load["d", p.dst] += nbytes
    if cur:
        buckets.append(tuple(cur))
    return TransferPlan(tuple(slots), tuple(pieces), tuple(buckets))


def checksum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the raw bits of ``t`` (int64, exact: the same on any device or thread count), so a
    changed, lost or moved element changes it."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = torch.remainder(t.detach().contiguous().view(ints).flatten().to(torch.int64), 65521)
    weights = torch.remainder(torch.arange(bits.numel(), dtype=torch.int64, device=bits.device), 65519) + 1
    return (bits * weights).sum().reshape(1)


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _piece_view(param: torch.Tensor, p: Piece) -> torch.Tensor:
    return param.narrow(p.dim, p.dst_start, p.length)


class WeightTransfer:
    """Trainer -> generator weight transfer over ``bridge`` (module docstring). Built on every rank of both sides with
    the same arguments (collective on the generator side: it creates the generator DP broadcast groups)."""

    def __init__(self, bridge: Bridge, arch: ArchSpec, trainer: SideLayout, generator: SideLayout,
                 bucket_bytes: int, verify: bool = False):
        if trainer.world != len(bridge.trainers) or generator.world != len(bridge.generators):
            raise InternalError(f"weight transfer layouts cover {trainer.world} trainer and {generator.world} "
                                f"generator ranks; the bridge has {len(bridge.trainers)} and "
                                f"{len(bridge.generators)}")
        if bucket_bytes <= 0:
            raise InternalError(f"weight transfer bucket_bytes = {bucket_bytes}: must be > 0")
        self.bridge, self.arch, self.trainer, self.generator = bridge, arch, trainer, generator
        self.bucket_bytes, self.verify = bucket_bytes, verify
        self.version: int | None = None
        self._plans: dict[int, TransferPlan] = {}
        self._dp_group, self._dp_root = None, None
        if bridge.role == GENERATE and generator.dp > 1:
            # a replica waits for its replica-0 peer, which itself waits up to the timeout for the trainers first
            timeout = datetime.timedelta(seconds=2 * bridge.timeout_s)
            me = generator.coords(bridge.side_rank)
            for p in range(generator.pp):
                for t in range(generator.tp):
                    ranks = [generator.rank(t, d, p) for d in range(generator.dp)]
                    group = dist.new_group(ranks, timeout=timeout)  # collective over the generator side
                    if (t, p) == (me[0], me[2]):
                        self._dp_group, self._dp_root = group, ranks[0]

    def plan(self, elem_bytes: int) -> TransferPlan:
        if elem_bytes not in self._plans:
            self._plans[elem_bytes] = plan_transfer(self.arch, self.trainer, self.generator, self.bucket_bytes,
                                                    elem_bytes)
        return self._plans[elem_bytes]

    def run(self, model, version: int) -> dict:
        """Send (trainers) or receive (generators) weights version ``version``; every rank of the job calls it. On a
        generator ``version`` is the one it expects (checked against the trainers' header). Returns this rank's
        metrics: version, seconds, buckets, bytes_sent, bytes_received, max_bucket_bytes."""
        if self.version is not None and version <= self.version:
            raise InternalError(f"weight transfer version {version} after version {self.version}: versions increase")
        phase = f"weight sync v{version}"
        t0 = time.perf_counter()
        stats = dict(buckets=0, bytes_sent=0, bytes_received=0, max_bucket_bytes=0)
        self.bridge.begin(phase)
        error = None
        try:
            if self.bridge.role == GENERATE:
                self._receive(_unwrap(model), version, phase, stats)
            else:
                self._send(_unwrap(model), version, phase, stats)
        except Exception as e:  # noqa: BLE001 - ended together in finish(): every rank raises, none is left waiting
            error = e
        self.bridge.finish(phase, error)
        self.version = version
        return dict(version=version, seconds=time.perf_counter() - t0, **stats)

    # ------------------------------------------------------------------ both sides
    def _header(self, version: int, dtype: torch.dtype) -> dict:
        return dict(version=version, dtype=str(dtype).removeprefix("torch."), arch=self.arch,
                    trainer=self.trainer, generator=self.generator, bucket_bytes=self.bucket_bytes,
                    verify=self.verify)

    def _params(self, m_, plan: TransferPlan, layout: SideLayout, side_rank: int, src: bool) -> dict[int, torch.Tensor]:
        """slot -> this rank's live parameter, for the slots this rank sends from (``src``) or holds (generators);
        checks that the model is the plan's layout and, on generators, that every parameter is covered."""
        tp_rank, _, pp_rank = layout.coords(side_rank)
        got = (dist.get_rank(m_.tp_group), dist.get_world_size(m_.tp_group), dist.get_rank(m_.pp_group),
               dist.get_world_size(m_.pp_group))
        if got != (tp_rank, layout.tp, pp_rank, layout.pp):
            raise InternalError(f"weight transfer: the model on side rank {side_rank} is at (tp_rank, tp, pp_rank, "
                                f"pp) = {got}, the plan expects {(tp_rank, layout.tp, pp_rank, layout.pp)}")
        layers = {layer.layer_number - 1: layer for layer in m_.decoder.layers}
        out = {}
        for k, slot in enumerate(plan.slots):
            if (slot.src_stage if src else slot.dst_stage) != pp_rank:
                continue
            if slot.tied_copy and not src:
                param = m_.output_layer.weight
            else:
                param = find_local_param(layers[slot.m.layer] if slot.m.layer is not None else m_, slot.m)
            if tuple(param.shape) != local_shape(slot.m, layout.tp):
                raise InternalError(f"weight transfer: {slot.name} has shape {tuple(param.shape)} on side rank "
                                    f"{side_rank}, the plan expects {local_shape(slot.m, layout.tp)}")
            out[k] = param
        if not src:
            covered = {id(p) for p in out.values()}
            left = [n for n, p in m_.named_parameters() if id(p) not in covered]
            if left:
                raise InternalError(f"weight transfer: parameters no tensor map covers on generator side rank "
                                    f"{side_rank}: {left}")
        return out

    # ------------------------------------------------------------------ trainers
    @torch.no_grad()
    def _send(self, m_, version: int, phase: str, stats) -> None:
        b = self.bridge
        dtype = next(m_.parameters()).dtype
        if b.is_main:
            for g in b.generators:
                b.send_obj(self._header(version, dtype), g, phase)
        plan = self.plan(torch.empty((), dtype=dtype).element_size())
        params = self._params(m_, plan, self.trainer, b.side_rank, src=True)
        for bucket in range(len(plan.buckets)):
            mine = {dst: ps for (src, dst), ps in plan.messages(bucket).items() if src == b.side_rank}
            if not mine:
                continue
            pending, held = Pending(), 0
            for dst, pieces in sorted(mine.items()):
                buf, sums = self._pack(pieces, params, dtype)
                b.isend(buf, b.generators[dst], pending, tag=_DATA_TAG)
                if self.verify:
                    b.isend(sums, b.generators[dst], pending, tag=_SUM_TAG)
                held += buf.nbytes
            b.wait(pending, phase)
            stats["buckets"] += 1
            stats["bytes_sent"] += held
            stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], held)

    def _pack(self, pieces: list[Piece], params: dict[int, torch.Tensor],
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One message: the pieces' rows copied into a flat CPU buffer, and their checksums (``verify``)."""
        buf = torch.empty(sum(p.numel for p in pieces), dtype=dtype)
        sums, off = [], 0
        for p in pieces:
            part = buf[off:off + p.numel]
            src_view = params[p.slot].narrow(p.dim, p.src_start, p.length)
            part.view(src_view.shape).copy_(src_view)
            if self.verify:
                sums.append(checksum(part))
            off += p.numel
        return buf, torch.cat(sums) if self.verify else None

    # ------------------------------------------------------------------ generators
    def _check_header(self, header: dict, version: int) -> None:
        mine = self._header(version, torch.float32)
        diffs = [f"{k}: trainers {header[k]!r} vs generators {mine[k]!r}" for k in
                 ("version", "trainer", "generator", "bucket_bytes", "verify") if header[k] != mine[k]]
        diffs += [f"arch {d}" for d in arch_diff(header["arch"], self.arch)]
        if diffs:
            raise InternalError("weight transfer: the trainers and this generator disagree: " + "; ".join(diffs))

    @torch.no_grad()
    def _receive(self, m_, version: int, phase: str, stats) -> None:
        from megatron_s2d.runtime.dist import comm_device

        b = self.bridge
        header = b.recv_obj(b.trainers[0], phase)
        self._check_header(header, version)
        dtype = getattr(torch, header["dtype"])
        plan = self.plan(torch.empty((), dtype=dtype).element_size())
        params = self._params(m_, plan, self.generator, b.side_rank, src=False)
        tp_rank, dp_rank, pp_rank = self.generator.coords(b.side_rank)
        leader = self.generator.rank(tp_rank, 0, pp_rank)
        bad = None
        for bucket in range(len(plan.buckets)):
            mine = sorted((src, ps) for (src, dst), ps in plan.messages(bucket).items() if dst == leader)
            if not mine:
                continue
            buf = torch.empty(sum(p.numel for _, ps in mine for p in ps), dtype=dtype)
            sums = torch.zeros(sum(len(ps) for _, ps in mine), dtype=torch.int64)
            if dp_rank == 0:
                pending, off, n_sums = Pending(), 0, 0
                for src, ps in mine:
                    size = sum(p.numel for p in ps)
                    b.irecv(buf[off:off + size], b.trainers[src], pending, tag=_DATA_TAG)
                    if self.verify:
                        b.irecv(sums[n_sums:n_sums + len(ps)], b.trainers[src], pending, tag=_SUM_TAG)
                    off, n_sums = off + size, n_sums + len(ps)
                b.wait(pending, phase)
                stats["bytes_received"] += buf.nbytes
            if self._dp_group is not None:
                buf = self._broadcast(buf.to(comm_device()), phase)
                if self.verify:
                    sums = self._broadcast(sums.to(comm_device()), phase).cpu()
            stats["buckets"] += 1
            stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], buf.nbytes)
            off, i = 0, 0
            for src, ps in mine:
                for p in ps:
                    part = buf[off:off + p.numel]
                    target = _piece_view(params[p.slot], p)
                    target.copy_(part.view(target.shape))
                    if self.verify and bad is None:
                        bad = self._check_piece(plan, p, part, target, int(sums[i]))
                    off, i = off + p.numel, i + 1
        if bad is not None:
            raise InternalError(bad)

    def _broadcast(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        """Bucket ``t`` from this generator's replica-0 peer (side rank ``_dp_root``) to its DP group."""
        try:
            dist.broadcast(t, src=self._dp_root, group=self._dp_group)
        except RuntimeError as e:
            raise self.bridge.timeout_error(phase, self.bridge.generators[self._dp_root], e) from e
        return t

    def _check_piece(self, plan: TransferPlan, p: Piece, part: torch.Tensor, target: torch.Tensor,
                     sent: int) -> str | None:
        """What is wrong with one received piece (None: nothing): its checksum against the sender's, and the
        parameter slice against the piece after the copy."""
        slot = plan.slots[p.slot]
        via = self.bridge.generators[p.dst]
        where = (f"{slot.name} [{p.full_start}:{p.full_start + p.length}] along dim {p.dim} (from trainer global "
                 f"rank {self.bridge.trainers[p.src]} to generator global rank {self.bridge.rank}"
                 + (f" via its replica-0 peer, global rank {via})" if via != self.bridge.rank else ")"))
        got = int(checksum(part.cpu()))
        if got != sent:
            return f"weight transfer check: {where} arrived changed (checksum {got}, sent {sent})"
        if not torch.equal(target, part.view(target.shape).to(target.device, target.dtype)):
            return f"weight transfer check: {where}: the parameter slice differs from the piece after the copy"
        return None
