"""The split world of ``rollout.placement: separate``: trainers and generators in one torchrun job, and the bridge
between them.

A stage job of W = T + N ranks splits: global ranks 0..T-1 train, T..W-1 generate (N = ``rollout.generation_ranks``)::

    bridge = split_world(generation_ranks=N, sync_timeout_s=plan.rollout.sync_timeout_s)
    info = init_distributed(tp, pp)     # this side's layout: trainers see a world of T, generators one of N
    ...
    bridge.send_obj(meta, dst=bridge.generators[0], phase="rollouts of step 5")

* Each side gets its OWN default process group (``init_process_group`` on a prefixed view of the job's store), so
  megatron-core's ``parallel_state``, ``init_distributed``, ``model_groups`` and every collective of the existing
  code work unchanged on each side, over that side's ranks. ``torch.distributed.get_rank()`` is the rank *within the
  side* there (``Bridge.side_rank``).
* The :class:`Bridge` is a gloo process group over all W ranks made directly from the store, never registered with
  ``torch.distributed`` (its rank is the global rank): vLLM's ``StatelessProcessGroup`` /
  ``stateless_init_torch_distributed_process_group`` (vllm 0.32.0 vllm/distributed/utils.py:196-260, 542-567,
  571-674: ``ProcessGroupGloo(PrefixStore(...), rank, size, timeout)`` outside the global state) is the precedent,
  as NeMo-RL's non-colocated refit group is (NeMo-RL 7ea279a nemo_rl/distributed/stateless_process_group.py:89-160;
  train ranks 0..T-1 in policy/workers/base_policy_worker.py:28-55, generation ranks T.. in
  generation/vllm/vllm_backend.py:228-251). Its timeout is ``rollout.sync_timeout_s``: every wait on the bridge is
  bounded by it, and a peer that does not answer in time (hung, crashed, or never arrived) becomes a
  :class:`BridgeTimeout` naming that peer's global rank, its role and the phase the caller was in.
* Payloads travel over gloo (CPU tensors) on GPU machines too. NeMo-RL moves them over NCCL instead: rank 0 puts an
  NCCL unique id in the store and every rank joins one communicator (stateless_process_group.py:102-153), then
  broadcasts from train rank 0. An NCCL bridge here is a later item: it needs a multi-GPU machine to test, and an
  NCCL timeout is not an exception the caller can name a peer in (the watchdog aborts the process).

``(store, rank, world)`` come from ``torch.distributed.rendezvous("env://")``, so both torchrun's agent store
(``TORCHELASTIC_USE_AGENT_STORE``: every rank is a client of the agent's store) and a bare ``MASTER_ADDR/PORT``
(global rank 0 hosts the store) work (torch 2.13 torch/distributed/rendezvous.py:162-206, 242-284).

Rank-0 duties. After the split, ``DistInfo.is_main`` (``runtime.dist``) is true on BOTH sides' rank 0 (trainer
global rank 0 and generator global rank T), since each side's world has its own rank 0. Whatever must be done once
per job (run-folder files, metrics, logs) must test :attr:`Bridge.is_main` (global rank 0, a trainer) instead;
per-side duties (a side's checkpoint shards, a side's own logs) keep ``DistInfo``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_s2d.errors import InternalError, S2DError

TRAIN, GENERATE = "train", "generate"
_OBJ_TAG = 1  # objects and tensors between the same two ranks never mix up
_KEEP_PHASES = 2  # this rank's "entered" marks kept in the store (older ones are deleted: the store stays small)


class BridgeTimeout(S2DError):
    """A peer across the bridge did not answer within ``rollout.sync_timeout_s`` (hung, crashed, or never reached
    the phase). ``peer`` is its global rank, ``role`` "train" or "generate", ``phase`` what the caller was doing."""

    def __init__(self, message: str, peer: int | None, role: str | None, phase: str):
        super().__init__(message)
        self.peer, self.role, self.phase = peer, role, phase


@dataclass
class Pending:
    """Point-to-point operations in flight on the bridge; :meth:`Bridge.wait` waits for them (names each peer)."""

    ops: list = field(default_factory=list)  # (work, peer, tensor kept alive until the wait)

    def __len__(self) -> int:
        return len(self.ops)


@dataclass(eq=False)
class Bridge:
    """This rank's place in the split world, and the gloo group over all W ranks (global ranks)."""

    role: str  # "train" | "generate"
    rank: int  # global rank (in the job's world of W)
    world: int  # W = trainers + generators
    trainers: tuple[int, ...]  # global ranks 0..T-1
    generators: tuple[int, ...]  # global ranks T..W-1
    side_rank: int  # rank in this side's own world (= torch.distributed.get_rank())
    group: Any  # ProcessGroupGloo over all W ranks, rank = global rank; not registered with torch.distributed
    store: Any  # the job's store (prefixed): phase marks and failure records
    timeout_s: float  # rollout.sync_timeout_s: the bound of every wait on the bridge
    _entered: list = field(default_factory=list)
    _began: float = 0.0  # time.monotonic() when this rank began its current phase

    @property
    def is_main(self) -> bool:
        """Global rank 0 (a trainer): the one rank that writes what is written once per job (see module docstring)."""
        return self.rank == 0

    @property
    def side_size(self) -> int:
        return len(self.trainers) if self.role == TRAIN else len(self.generators)

    def role_of(self, rank: int) -> str:
        return TRAIN if rank < len(self.trainers) else GENERATE

    def describe(self, rank: int) -> str:
        side = rank if rank < len(self.trainers) else rank - len(self.trainers)
        return f"global rank {rank} ({self.role_of(rank)} rank {side})"

    # ------------------------------------------------------------------ phases and failures
    def begin(self, phase: str) -> None:
        """Mark that this rank reached ``phase`` (one store key): a later failure names the ranks that never did."""
        self.store.set(f"entered/{phase}/{self.rank}", "1")
        self._began = time.monotonic()
        self._entered.append(phase)
        while len(self._entered) > _KEEP_PHASES:
            self.store.delete_key(f"entered/{self._entered.pop(0)}/{self.rank}")

    def _missing(self, phase: str) -> list[int]:
        """Ranks that have not marked ``phase`` (failure path only: one store lookup per rank)."""
        return [r for r in range(self.world) if not self.store.check([f"entered/{phase}/{r}"])]

    def timeout_error(self, phase: str, peer: int | None, err: BaseException | str) -> BridgeTimeout:
        """The :class:`BridgeTimeout` for a wait in ``phase`` that failed (``peer``: the rank waited on, None for a
        collective). Once a whole timeout has passed in the phase, ranks that never reached it are the likelier
        culprits than the peer waited on (which may itself be waiting on them), so they are named first; a failure
        sooner than that (a peer's connection closed: it crashed) names the peer. Only phases this rank
        :meth:`begin` -s are checked that way (in others, nobody marks anything)."""
        marked = bool(self._entered) and self._entered[-1] == phase
        waited = time.monotonic() - self._began >= 0.9 * self.timeout_s
        missing = [r for r in self._missing(phase) if r != self.rank] if marked and (waited or peer is None) else []
        if missing:
            culprit = missing[0]
            why = f"it never reached {phase!r}" + (
                f" (nor did global ranks {', '.join(map(str, missing[1:6]))}{' ...' if len(missing) > 6 else ''})"
                if len(missing) > 1 else "")
        else:
            recorded = self.recorded_failure(phase, wait_s=0.0)
            if isinstance(recorded, BridgeTimeout):
                return recorded
            culprit = peer
            why = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        who = self.describe(culprit) if culprit is not None else "a bridge rank"
        return BridgeTimeout(
            f"{phase}: {who} did not answer within rollout.sync_timeout_s = {self.timeout_s:g} s ({why}; seen by "
            f"{self.describe(self.rank)}). Look at that rank's log first: it crashed or hung; if it is only slow, "
            "raise rollout.sync_timeout_s", culprit, self.role_of(culprit) if culprit is not None else None, phase)

    def record_failure(self, phase: str, error: BaseException) -> None:
        """Store why ``phase`` failed on this rank (the first record of a phase wins), for the ranks that only learn
        that it failed (:meth:`finish`)."""
        if isinstance(error, BridgeTimeout):
            value = pickle.dumps(("timeout", str(error), error.peer, error.role))
        else:
            value = pickle.dumps(("error", f"{self.describe(self.rank)} failed in {phase}: "
                                           f"{type(error).__name__}: {error}", None, None))
        self.store.compare_set(f"failed/{phase}", "", value)

    def recorded_failure(self, phase: str, wait_s: float) -> Exception | None:
        """The failure recorded for ``phase`` (waiting up to ``wait_s`` for it to appear), or None."""
        key = f"failed/{phase}"
        try:
            if wait_s > 0:
                self.store.wait([key], datetime.timedelta(seconds=wait_s))
            elif not self.store.check([key]):
                return None
        except dist.DistStoreError:
            return None
        kind, message, peer, role = pickle.loads(self.store.get(key))
        return BridgeTimeout(message, peer, role, phase) if kind == "timeout" else InternalError(message)

    def agree(self, ok: bool, phase: str) -> bool:
        """True when ``ok`` on every rank of the bridge (an all-reduce; a rank that does not join within the timeout
        is a :class:`BridgeTimeout`)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        try:
            self.group.allreduce([flag], opts).wait()
        except RuntimeError as e:
            raise self.timeout_error(phase, None, e) from e
        return bool(flag.item())

    def finish(self, phase: str, error: BaseException | None) -> None:
        """End ``phase`` together: every rank returns, or every rank raises. A rank whose part failed records why; the
        others then raise that (:class:`BridgeTimeout` for a silent peer, ``InternalError`` otherwise), so no rank
        is left waiting. The failing rank re-raises its own exception."""
        if error is not None:
            self.record_failure(phase, error)
            if isinstance(error, BridgeTimeout):
                raise error  # the bridge is broken: the others time out in the all-reduce and read the record
        try:
            if self.agree(error is None, phase):
                return
        except BridgeTimeout as e:
            if error is not None:
                raise error from e
            raise
        if error is not None:
            raise error
        recorded = self.recorded_failure(phase, wait_s=self.timeout_s)
        raise recorded if recorded is not None else InternalError(
            f"{phase}: a rank reported a failure but recorded no reason in the store")

    # ------------------------------------------------------------------ point to point (global ranks, CPU tensors)
    def isend(self, tensor: torch.Tensor, dst: int, pending: Pending, tag: int = 0) -> None:
        tensor = _cpu(tensor)
        pending.ops.append((self.group.send([tensor], dst, tag), dst, tensor))

    def irecv(self, tensor: torch.Tensor, src: int, pending: Pending, tag: int = 0) -> None:
        pending.ops.append((self.group.recv([_cpu(tensor)], src, tag), src, tensor))

    def wait(self, pending: Pending, phase: str) -> None:
        """Wait for every operation of ``pending`` (each bounded by the timeout); a failure names its peer."""
        ops, pending.ops = pending.ops, []
        for work, peer, _ in ops:
            try:
                work.wait()
            except RuntimeError as e:
                raise self.timeout_error(phase, peer, e) from e

    def send(self, tensor: torch.Tensor, dst: int, phase: str, tag: int = 0) -> None:
        pending = Pending()
        self.isend(tensor, dst, pending, tag)
        self.wait(pending, phase)

    def recv(self, tensor: torch.Tensor, src: int, phase: str, tag: int = 0) -> None:
        pending = Pending()
        self.irecv(tensor, src, pending, tag)
        self.wait(pending, phase)

    def isend_obj(self, obj: Any, dst: int, pending: Pending, tag: int = _OBJ_TAG) -> None:
        """Start sending a picklable object to global rank ``dst``: its length, then its bytes (``pending`` keeps
        the buffers alive until :meth:`wait`)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.isend(torch.tensor([data.numel()], dtype=torch.int64), dst, pending, tag=tag)
        self.isend(data, dst, pending, tag=tag)

    def send_obj(self, obj: Any, dst: int, phase: str, tag: int = _OBJ_TAG) -> None:
        """Send a small picklable object (metadata) to global rank ``dst`` and wait until it is received."""
        pending = Pending()
        self.isend_obj(obj, dst, pending, tag)
        self.wait(pending, phase)

    def recv_obj(self, src: int, phase: str, tag: int = _OBJ_TAG) -> Any:
        """The object global rank ``src`` sent with :meth:`send_obj` / :meth:`isend_obj` (the same ``tag``)."""
        n = torch.zeros(1, dtype=torch.int64)
        self.recv(n, src, phase, tag=tag)
        data = torch.empty(int(n.item()), dtype=torch.uint8)
        self.recv(data, src, phase, tag=tag)
        return pickle.loads(data.numpy().tobytes())




def _cpu(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise InternalError(f"bridge tensors are contiguous CPU tensors (gloo); got one on {t.device}, "
                            f"contiguous={t.is_contiguous()}")
    return t


def split_world(generation_ranks: int, sync_timeout_s: float, backend: str | None = None,
                timeout_s: float | None = None) -> Bridge:
    """Split the launched world into trainers (global ranks 0..T-1) and ``generation_ranks`` generators (the last
    ones), give each side its own default process group, and return the :class:`Bridge` between them.

    Call it before :func:`megatron_s2d.runtime.dist.init_distributed` (which then sets up megatron's groups over this
    side's world); without a split, ``init_distributed`` works as before. ``backend``: each side's (default: nccl on
    GPU, gloo on CPU, as ``init_distributed``); ``timeout_s``: each side's collective timeout (default
    ``runtime.dist.COLLECTIVE_TIMEOUT_S``); ``sync_timeout_s``: the bridge's.
    """
    from megatron_s2d.runtime.dist import COLLECTIVE_TIMEOUT_S
    from megatron_s2d.runtime.groups import clear_cache

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise S2DError(f"rollout.placement = 'separate' needs a launched job (torchrun or SLURM), but "
                       f"{', '.join(missing)} is not set: launch the stage with `s2d run`, or set "
                       "rollout.placement: colocated")
    world = int(os.environ["WORLD_SIZE"])
    if not 0 < generation_ranks < world:
        raise S2DError(f"rollout.generation_ranks = {generation_ranks}: with rollout.placement = 'separate' it must "
                       f"be between 1 and {world - 1} in a job of {world} ranks (at least one rank trains); change "
                       "rollout.generation_ranks or the job's number of processes")
    if sync_timeout_s <= 0:
        raise S2DError(f"rollout.sync_timeout_s = {sync_timeout_s}: must be > 0 seconds")
    if dist.is_initialized():
        raise InternalError("split_world must run before any default process group exists (init_distributed joins "
                            "this side's world after it)")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    side_timeout = datetime.timedelta(seconds=timeout_s or COLLECTIVE_TIMEOUT_S)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # as init_distributed: one host when nothing says otherwise
    store, rank, world = next(dist.rendezvous("env://", timeout=side_timeout))
    trainers = world - generation_ranks
    role = TRAIN if rank < trainers else GENERATE
    side_rank, side_size = (rank, trainers) if role == TRAIN else (rank - trainers, generation_ranks)
    clear_cache()  # groups of an earlier world in this process are gone with it
    kwargs = {}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)  # as init_distributed: bind this side's world to the GPU
    dist.init_process_group(backend, store=dist.PrefixStore(f"s2d/{role}/", store), rank=side_rank,
                            world_size=side_size, timeout=side_timeout, **kwargs)
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    sync = datetime.timedelta(seconds=sync_timeout_s)
    group = ProcessGroupGloo(dist.PrefixStore("s2d/bridge/", store), rank, world, sync)
    return Bridge(role=role, rank=rank, world=world, trainers=tuple(range(trainers)),
                  generators=tuple(range(trainers, world)), side_rank=side_rank, group=group,
                  store=dist.PrefixStore("s2d/bridge-meta/", store), timeout_s=float(sync_timeout_s))
