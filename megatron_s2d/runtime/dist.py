"""Distributed initialisation: nccl on GPU, gloo on CPU, megatron-core model-parallel groups.

One entry point, :func:`init_distributed`, used by every stage, test and benchmark. It works both under
``torchrun`` (reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and in a bare single process (it then
creates a world of one on a free loopback port), so the same code paths run in a notebook, CI and on SLURM.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.runtime import cpu_shim


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this process computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device() -> torch.device:
    """Where tensors for collectives on the default group must live (nccl: the GPU; gloo: the CPU)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# How long a collective may wait for the slowest rank before the job is aborted (NCCL's watchdog). Legitimate waits
# are long in RL: a rank whose rollouts (or share of the final evaluation) finish first waits in the next collective
# (the DP all-reduce, exchange, all_gather_object) for the others, tens of minutes with 8k-token responses on the
# megatron sampler, and every rank waits at barriers while a 70B checkpoint is written. torch's defaults (10 min for
# NCCL groups, 30 for the default group) and megatron's (initialize_model_parallel(distributed_timeout_minutes=30))
# would abort such jobs; 2 h still ends a real hang well inside a SLURM allocation.
COLLECTIVE_TIMEOUT_S = 2 * 3600


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = COLLECTIVE_TIMEOUT_S) -> DistInfo:
    """Initialise torch.distributed (if needed) and megatron-core's tensor/pipeline/data-parallel groups.

    Re-initialises the model-parallel groups when called again with another layout (used by tests and by the
    conversion tool); the world itself is created once per process. ``timeout_s``: the collective timeout of the
    world and of megatron's groups.
    """
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_shim.enable()
    backend = "nccl" if cuda else "gloo"
    created = not torch.distributed.is_initialized()
    if created:
        from megatron_s2d.runtime.groups import clear_cache

        clear_cache()  # groups of an earlier world in this process are gone with it
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "RANK" not in os.environ:
            # a bare single process: its own free port, always. An inherited MASTER_PORT is the parent's (a test
            # process or notebook that initialised a world of its own, whose store still listens there), and
            # reusing it fails with EADDRINUSE
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(_free_port()))
        kwargs = {}
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            # bind the world to this rank's GPU: NCCL's communicator is created now (a bad GPU or fabric fails at
            # start-up, not at the first collective), new groups are split from it, and barrier() runs on this device
            # instead of guessing one (torch warns "devices used by this process are currently unknown")
            kwargs["device_id"] = torch.device("cuda", local)
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    world = torch.distributed.get_world_size()
    if world % (tp * pp) != 0:
        raise S2DError(
            f"parallel layout: world size {world} is not divisible by tensor_parallel ({tp}) x "
            f"pipeline_parallel ({pp}); launch {tp * pp * max(1, world // (tp * pp))} processes or change the layout"
        )
    if parallel_state.model_parallel_is_initialized():
        # groups left over from an earlier world (destroyed without destroy_model_parallel) are not reusable
        if (not created and parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp):
            return dist_info(backend)
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=True,  # the distributed optimizer needs the gloo DP groups too
        distributed_timeout_minutes=max(1, timeout_s // 60),  # megatron's own default is 30 min
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dist_info(backend)


def dist_info(backend: str | None = None) -> DistInfo:
    """This rank's place in the job's current layout (after :func:`init_distributed`)."""
    backend = backend or torch.distributed.get_backend()
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    world = torch.distributed.get_world_size()
    return DistInfo(
        rank=torch.distributed.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp=tp, pp=pp, dp=world // (tp * pp), dp_rank=ps.get_data_parallel_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(), backend=backend,
        device=device(),
    )


def data_parallel_group():
    """The data-parallel process group of the job's layout (the trained model's)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def is_dp_writer() -> bool:
    """One rank per data-parallel group (tensor- and pipeline-parallel rank 0): the one that writes what the group
    holds in common (the other ranks hold identical data)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def shutdown() -> None:
    """Tear down model-parallel groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        from megatron_s2d.runtime.groups import clear_cache

        clear_cache()
        torch.distributed.destroy_process_group()


def all_ranks_agree(flag: bool, group=None) -> bool:
    """True only if ``flag`` is true on every rank of ``group`` (default: the world). For branches that lead into
    collectives: every rank must take the same one (e.g. "is the cache complete?" when some ranks crashed before
    writing theirs)."""
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
    return t.item() > 0


def all_reduce_sum(values: list[float], group=None) -> list[float]:
    """Sum a few Python numbers over ``group`` (float64 on the communication device; one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, group=group)
    return t.tolist()
