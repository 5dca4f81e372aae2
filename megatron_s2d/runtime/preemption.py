"""Preemption and time-limit handling: catch SIGTERM / SIGUSR1, agree across ranks, save, requeue, exit.

Protocol for a stage loop (checked once per step; the all-reduce costs one tiny collective)::

    handler = PreemptionHandler().install()          # main thread, before spawning rollout/reward processes
    for step in ...:
        ...train one step...
        if handler.should_stop(distributed=dist.is_initialized()):
            save_checkpoint(...)                       # every rank, complete and durable (atomic rename) first
            sys.exit(handler.finish(rank=dist.get_rank(), distributed=dist.is_initialized()))
    handler.uninstall()

Signals and what they mean (SLURM semantics):
  * **SIGUSR1** — the sbatch scripts ask for ``--signal=USR1@<launch.slurm.signal_seconds_before_end>``: the time
    limit is near. After the save, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (the job is submitted with
    ``--requeue``); the job goes back to the queue under the same id, so stages that depend on it (``afterok``) keep
    waiting, and when it starts again the stage resumes from the checkpoint just written.
    Exit code :data:`EXIT_REQUEUED` (0) when the requeue was accepted.
  * **SIGTERM** — scancel, preemption, the hard time limit, or Ctrl-C / cancel of a local run. Save and stop without
    requeueing (a preempting SLURM configured with ``PreemptMode=REQUEUE`` requeues by itself; a user's scancel means
    stop). Exit code :data:`EXIT_PREEMPTED`.
  * No requeue possible (not under SLURM, no ``scontrol``, or it failed): :data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL),
    non-zero on purpose so that nothing downstream mistakes the stopped stage for a finished one (``afterok``
    dependents do not start; the local launcher reports it). Re-running the plan resumes the stage.

Processes that the stage spawns (vLLM engine cores, reward workers) receive SIGUSR1 too on clusters whose process
tracking signals the whole job step (cgroup), and its default action kills them. Start them inside
:meth:`PreemptionHandler.shield_children` (blocks SIGUSR1 while spawning; the block is inherited, so they never see
it), or start them in a session of their own (the reward workers: ``rewards.pool``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Iterator

EXIT_REQUEUED = 0  # checkpoint saved and `scontrol requeue` accepted: SLURM runs the job again
EXIT_PREEMPTED = 75  # checkpoint saved, no requeue: re-run the plan to resume (EX_TEMPFAIL)

# Order matters: the all-reduced flag vector is indexed by it.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


def _slurm_requeue(job_id: str) -> bool:
    """Ask SLURM to requeue ``job_id``; True when scontrol accepted it."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print("[preemption] scontrol not found: cannot requeue; re-run the plan to resume", file=sys.stderr, flush=True)
        return False
    try:
        res = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"[preemption] scontrol requeue {job_id} failed: {e}", file=sys.stderr, flush=True)
        return False
    if res.returncode != 0:
        print(f"[preemption] scontrol requeue {job_id} failed ({res.returncode}): {res.stderr.strip()}",
              file=sys.stderr, flush=True)
        return False
    print(f"[preemption] requeued SLURM job {job_id}", flush=True)
    return True


class PreemptionHandler:
    """Flags SIGTERM / SIGUSR1 (main thread only) and turns them into one decision all ranks share."""

    def __init__(self) -> None:
        self._received: dict[int, bool] = {int(s): False for s in SIGNALS}
        self._previous: dict[int, object] = {}
        self._agreed: list[bool] | None = None

    # ---------------------------------------------------------------- installation
    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread (Python delivers "
                               "signals only there)")
        for s in SIGNALS:
            if int(s) not in self._previous:
                self._previous[int(s)] = signal.getsignal(s)
            signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before :meth:`install`."""
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:
        first = not any(self._received.values())
        self._received[signum] = True
        if first:
            print(f"[preemption] received {signal.Signals(signum).name}: will checkpoint and stop after this step",
                  file=sys.stderr, flush=True)

    @staticmethod
    @contextlib.contextmanager
    def shield_children() -> Iterator[None]:
        """Block SIGUSR1 in this thread while spawning processes: they inherit the block and never receive it.

        A SIGUSR1 arriving meanwhile stays pending and is delivered to this process when the block is lifted.
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ---------------------------------------------------------------- decisions
    @property
    def local_signals(self) -> list[str]:
        """Names of the signals this process has received."""
        return [signal.Signals(s).name for s, got in self._received.items() if got]

    def should_stop(self, distributed: bool, group=None) -> bool:
        """True on every rank as soon as any rank received a signal (MAX all-reduce; works on gloo and nccl).

        ``distributed``: whether torch.distributed is initialised (False: this process's own flags decide).
        """
        flags = [self._received[int(s)] for s in SIGNALS]
        if distributed:
            import torch
            import torch.distributed as dist

            backend = str(dist.get_backend(group))
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
            t = torch.tensor([float(f) for f in flags], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flags = [bool(v) for v in t.tolist()]
        self._agreed = flags
        return any(flags)

    @property
    def requeue_requested(self) -> bool:
        """Whether the agreed signals ask for a requeue (SIGUSR1: time limit approaching)."""
        flags = self._agreed if self._agreed is not None else [self._received[int(s)] for s in SIGNALS]
        return flags[SIGNALS.index(signal.SIGUSR1)]

    def finish(self, rank: int, distributed: bool, group=None) -> int:
        """After the checkpoint is saved: requeue when asked and possible (rank 0); return the exit code to use.

        Every rank returns the same code (rank 0's requeue outcome is shared with a MAX all-reduce).
        """
        ok = False
        job_id = os.environ.get("SLURM_JOB_ID")
        if rank == 0 and self.requeue_requested and job_id:
            ok = _slurm_requeue(job_id)
        if distributed:
            import torch
            import torch.distributed as dist

            backend = str(dist.get_backend(group))
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
            t = torch.tensor([float(ok)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            ok = bool(t.item())
        return EXIT_REQUEUED if ok else EXIT_PREEMPTED
