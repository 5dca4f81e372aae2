"""Run a test function in N local processes joined by a torch.distributed (gloo) process group.

Usage (the function must live at module level so that the spawned children can import it by name)::

    import torch, torch.distributed as dist
    from tests.distributed._launch import run_distributed

    def _sum_ranks(rank, world_size, scale):          # runs in every child, process group already initialised
        t = torch.tensor([float(rank)]) * scale
        dist.all_reduce(t)
        assert t.item() == scale * sum(range(world_size))
        return t.item()                               # return values come back to the parent, in rank order

    def test_sum_ranks():
        assert run_distributed(_sum_ranks, world_size=2, scale=3.0) == [3.0, 3.0]

What it does:
- spawns `world_size` processes with the *spawn* start method (fork is unsafe with torch threads), each with
  MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE set, and
  `torch.set_num_threads(cpu_count // world_size)` so the ranks do not oversubscribe the cores;
- initialises the default process group (`backend="gloo"`, timeout = `timeout`) unless `init_process_group=False`
  (for tests of code that initialises distributed itself), calls `fn(rank, world_size, **kwargs)`, then destroys
  the process group;
- sends each rank's return value back (plain pickle, so tensors travel by value) or, on an exception, its
  traceback text; the parent raises :class:`DistributedError` carrying every failing rank's remote traceback,
  so pytest shows the real failure;
- on the first failure, waits `_ERROR_GRACE_S` for the other ranks' reports, then kills the rest; at `timeout`
  seconds it kills stragglers and says which ranks never finished (usually a rank stuck in a collective).

Cost: one torch import per child (~1-2 s, the children start in parallel). Run several checks inside one `fn`
rather than spawning per check.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

__all__ = ["DistributedError", "run_distributed"]

_ERROR_GRACE_S = 5.0  # after one rank fails, how long to wait for the others' reports before killing them
_POLL_S = 0.2


class DistributedError(RuntimeError):
    """One or more ranks of a :func:`run_distributed` job failed, died or timed out; the message has the details."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    fn: Callable, rank: int, world_size: int, port: int, reports, kwargs: dict, options: dict
) -> None:
    """Entry point of each spawned rank: set the env, init the group, run `fn`, report the outcome."""
    os.environ.update(options["env"])
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(options["threads"])
        if options["init_process_group"]:
            if options["backend"] == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(
                options["backend"], rank=rank, world_size=world_size, timeout=timedelta(seconds=options["timeout"])
            )
        try:
            value = fn(rank, world_size, **kwargs)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        report = ("ok", rank, pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - everything, including SystemExit, goes back to the parent as text
        report = ("error", rank, traceback.format_exc())
    reports.put(report)


def _check_callable(fn: Callable) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(
            f"run_distributed: fn must be a module-level function (children import it by name), got {fn!r}"
        )


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _collect(procs: list, reports, timeout: float) -> dict[int, tuple[str, Any]]:
    """Wait for every rank's report (or its death / the deadline); stop early, after a grace period, on failure."""
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(procs):
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            kind, rank, payload = reports.get(timeout=min(_POLL_S, deadline - now))
        except queue.Empty:
            for rank, p in enumerate(procs):
                if rank not in outcomes and p.exitcode is not None:
                    try:  # a report put just before exiting may still be in the pipe
                        kind, r, payload = reports.get(timeout=_POLL_S)
                        outcomes[r] = (kind, payload)
                    except queue.Empty:
                        outcomes[rank] = ("died", f"exited with code {p.exitcode} without reporting (see stderr)")
        else:
            outcomes[rank] = (kind, payload)
        if any(k != "ok" for k, _ in outcomes.values()):
            deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    return outcomes


def run_distributed(
    fn: Callable,
    world_size: int = 2,
    timeout: float = 120.0,
    *,
    backend: str = "gloo",
    init_process_group: bool = True,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, **kwargs)`` in `world_size` spawned processes; return the results in rank order.

    Args:
        fn: a module-level function (the children import it by its module and name).
        world_size: number of processes.
        timeout: seconds for the whole job (also the process group's collective timeout).
        backend: torch.distributed backend ("gloo" on CPU; "nccl" also sets the CUDA device to the rank).
        init_process_group: initialise/destroy the default process group around `fn`.
        threads_per_rank: torch intra-op threads per child; default cpu_count // world_size (at least 1).
        env: extra environment variables for the children.
        **kwargs: passed to `fn` (must be picklable).

    Raises:
        DistributedError: a rank raised (its remote traceback is in the message), died, or did not finish in time.
    """
    _check_callable(fn)
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    options = {
        "backend": backend,
        "init_process_group": init_process_group,
        "timeout": timeout,
        "threads": threads_per_rank or max(1, (os.cpu_count() or 1) // world_size),
        "env": dict(env or {}),
    }
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, reports, kwargs, options),
            name=f"{fn.__name__}-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        outcomes = _collect(procs, reports, timeout)
    finally:
        _stop(procs)
        reports.close()
    failures = [f"--- rank {r}: {kind} ---\n{text}" for r, (kind, text) in sorted(outcomes.items()) if kind != "ok"]
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        elapsed = time.monotonic() - start
        failures.append(
            f"--- ranks {missing} did not finish ({elapsed:.0f} s, timeout {timeout} s): killed; a rank stuck in a "
            "collective usually means the ranks called collectives in different orders or another rank failed ---"
        )
    if failures:
        header = f"{fn.__module__}.{fn.__qualname__} failed on {world_size} ranks:\n"
        raise DistributedError(header + "\n".join(failures))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
