"""A stage (or run folder) lock: a second holder fails at once naming the first; a holder killed with SIGKILL leaves
a lock file that blocks nobody."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_s2d.runtime.locks import LockHeld, hold_lock

HOLD = """
import sys, time
from megatron_s2d.runtime.locks import hold_lock
with hold_lock(sys.argv[1], "stage 'opd'"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_holder_fails_naming_the_first_and_a_killed_holder_blocks_nobody(tmp_path):
    lock = tmp_path / "stages" / "opd" / "LOCK"
    env = dict(os.environ, SLURM_JOB_ID="4242")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as e:
            with hold_lock(lock, "stage 'opd'"):
                pass
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and "SLURM job 4242" in msg and "stage 'opd' is in use" in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock.read_text()  # the dead holder's description is still in the file ...
    with hold_lock(lock, "stage 'opd'") as info:  # ... but the kernel released its lock
        assert info["pid"] == os.getpid()
    with hold_lock(lock, "stage 'opd'"):  # released at the end of the block, re-entrant from scratch
        time.sleep(0)
