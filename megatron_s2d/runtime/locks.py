"""Exclusive locks on run folders: one launcher per run folder, one job per stage.

    with hold_lock(layout.stage("opd") / "LOCK", what="stage 'opd'"):
        ...  # a second holder fails at once, naming this one (host, pid, user, SLURM job, since when)

Two ``s2d run`` of the same plan at once (two users, or a resubmitted SLURM job next to a running one) would both
write one stage's checkpoints and metrics. The lock is ``fcntl.flock`` on a file in the folder, held for the life of
the holder: the kernel releases it when the holder exits or dies (SIGKILL, OOM, a node reboot of a local disk), so a
lock file left behind never blocks anyone; only a live holder does. On network filesystems flock needs the mount to
support it (NFSv4 emulates it with byte-range locks; Lustre needs the ``flock`` mount option): where it does not,
``flock`` raises and the message says so. The file keeps the holder's description for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from megatron_s2d.errors import S2DError


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": getpass.getuser(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def _describe(info: dict) -> str:
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return (f"pid {info.get('pid')} on {info.get('host')} (user {info.get('user')}{job}) since {info.get('since')}: "
            f"{info.get('command', '')}")


class LockHeld(S2DError):
    """Someone else holds the lock."""


@contextlib.contextmanager
def hold_lock(path: Path, what: str) -> Iterator[dict]:
    """Hold an exclusive lock on ``path`` (created if needed) until the block exits; raise :class:`LockHeld` naming
    the holder if another process has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                info = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                info = {}
            raise LockHeld(f"{what} is in use by {_describe(info)} (lock {path}). Two runs must not write one stage: "
                           "wait for it to finish, or stop it (its checkpoint lets a re-run resume)") from None
        except OSError as e:
            raise S2DError(f"cannot lock {path} ({e}): the filesystem does not support flock; mount it with flock "
                           "support (Lustre: -o flock) or put run_dir elsewhere") from e
        info = holder_info()
        f.seek(0)
        f.truncate()
        f.write(json.dumps(info))
        f.flush()
        try:
            yield info
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()
