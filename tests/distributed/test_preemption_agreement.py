"""PreemptionHandler across two gloo ranks: a signal seen by one rank stops both, with the same decision and the same
exit code (rank 0's requeue outcome is shared)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.distributed._launch import run_distributed

pytestmark = pytest.mark.distributed


def _agree(rank, world_size, fake_bin):
    from megatron_s2d.runtime.preemption import EXIT_REQUEUED, PreemptionHandler

    os.environ["PATH"] = f"{fake_bin}:{os.environ['PATH']}"
    os.environ["SLURM_JOB_ID"] = "77"
    h = PreemptionHandler().install()
    first = h.should_stop(distributed=True)  # nobody signalled yet
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
    stop, requeue = h.should_stop(distributed=True), h.requeue_requested
    code = h.finish(rank=rank, distributed=True)
    h.uninstall()
    return first, stop, requeue, code == EXIT_REQUEUED, h.local_signals


def test_one_rank_signal_stops_all(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'called'}\n")
    fake.chmod(0o755)
    out = run_distributed(_agree, world_size=2, fake_bin=str(tmp_path))
    assert [o[:4] for o in out] == [(False, True, True, True)] * 2
    assert out[0][4] == [] and out[1][4] == ["SIGUSR1"]  # only rank 1 saw it locally
    assert (tmp_path / "called").read_text().split() == ["requeue", "77"]  # called once, by rank 0
