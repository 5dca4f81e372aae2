"""``torchrun`` with SIGUSR1 forwarded to its workers: the per-node launcher of every stage job.

Usage (same arguments as torchrun)::

    python -m megatron_s2d.launch.agent --nnodes 1 --nproc-per-node 2 --standalone \\
        -m megatron_s2d.stages.entry --plan RUN_DIR/plan.resolved.yaml --stage opd

Why not plain torchrun: SLURM's ``--signal=USR1@<seconds>`` (sent shortly before the time limit so a stage can save
and requeue) reaches every process of the job step, and torchrun's elastic agent does not handle SIGUSR1, so its
default action would kill the agent, and slurmstepd would then kill the workers in the middle of their checkpoint.
Asking torchrun to handle SIGUSR1 (``--signals-to-handle``) is no better: it shuts the workers down and kills them
after 30 s. This wrapper installs a SIGUSR1 handler in the agent that forwards the signal to its direct children
(the workers), so the workers' :class:`megatron_s2d.runtime.preemption.PreemptionHandler` sees it whatever the
cluster's process tracking (cgroup delivers it to the workers too; a second delivery only sets the same flag), while
the agent keeps supervising until the workers exit after their save. SIGTERM keeps torchrun's own handling (it
forwards SIGTERM to the workers and kills them 30 s later).
"""

from __future__ import annotations

import os
import signal
import sys


def forward_to_children(signum: int, frame=None) -> None:
    """Send ``signum`` to this process's direct children (the torchrun workers); never to grandchildren."""
    import psutil

    for child in psutil.Process(os.getpid()).children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> None:
    """torchrun, and its exit code is the first failing worker's (torchrun itself exits 1 whatever the workers
    said): 75 (stopped with a checkpoint) or 2 (bad input) reach the launcher and SLURM as the stage entry returned
    them, and a worker killed by signal N gives 128 + N, as a shell reports it."""
    signal.signal(signal.SIGUSR1, forward_to_children)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:  # torchrun's @record has already printed its failure report
        _, failure = e.get_first_failure()
        code = failure.exitcode
        sys.exit(128 - code if code < 0 else (code or 1))


if __name__ == "__main__":
    main()
