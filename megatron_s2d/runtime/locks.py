"""Exclusive locks on run folders: one launcher per run folder, one job per stage.

    with hold_lock(layout.stage("opd") / "LOCK", what="stage 'opd'"):      # one process (the launcher)
        ...  # a second holder fails at once, naming this one (host, pid, user, SLURM job, since when)
    with hold_lock_collective(layout.stage_lock("opd"), "stage 'opd'"):     # every rank of a stage job: rank 0
        ...  # holds it; a refusal is raised on every rank (none is left waiting in a collective)

Two ``s2d run`` of the same plan at once (two users, or a resubmitted SLURM job next to a running one) would both
write one stage's checkpoints and metrics. The lock is ``fcntl.flock`` on a file in the folder, held for the life of
the holder: the kernel releases it when the holder exits or dies (SIGKILL, OOM, a node reboot of a local disk), so a
lock file left behind never blocks anyone; only a live holder does. On network filesystems flock needs the mount to
support it (NFSv4 emulates it with byte-range locks, and releases a crashed *node's* locks when its lease expires,
~90 s; Lustre needs the ``flock`` mount option): where it does not, ``flock`` raises and the message says so. The file keeps the holder's description for the error message.
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


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (some containers)
        return f"uid {os.getuid()}"


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def _describe(info: dict) -> str:
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return (f"pid {info.get('pid')} on {info.get('host')} (user {info.get('user')}{job}) since {info.get('since')}: "
            f"{info.get('command', '')}")


class LockHeld(S2DError):
    """Someone else holds the lock."""


def _open(path: Path):
    """The lock file for locking: read-write (created if needed), or read-only where it belongs to someone else
    (flock works on a read-only descriptor, so a live holder is still named)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+"), True
    except PermissionError:
        try:
            return open(path), False
        except OSError as e:
            raise S2DError(f"cannot open the lock file {path} ({e}): this folder is not yours to write; use a "
                           "run_dir of your own") from e


def _holder(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


@contextlib.contextmanager
def hold_lock(path: Path, what: str) -> Iterator[dict]:
    """Hold an exclusive lock on ``path`` (created if needed) until the block exits; raise :class:`LockHeld` naming
    the holder if another process has it."""
    path = Path(path)
    f, writable = _open(path)
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"{what} is in use by {_describe(_holder(f))} (lock {path}). Two runs must not write one "
                           "stage: wait for it to finish, or stop it (its checkpoint lets a re-run resume)") from None
        except OSError as e:
            raise S2DError(f"cannot lock {path} ({e}): the filesystem does not support flock; mount it with flock "
                           "support (Lustre: -o flock) or put run_dir elsewhere") from e
        if not writable:
            owner = path.stat().st_uid
            raise S2DError(f"{what}: its lock file {path} belongs to uid {owner}, not to you "
                           f"({_user()}); nobody is running it now, but its files are not yours to write: "
                           "use a run_dir of your own (or ask its owner)")
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


@contextlib.contextmanager
def hold_lock_collective(path: Path, what: str) -> Iterator[None]:
    """:func:`hold_lock` for a distributed job: rank 0 takes the lock; its refusal (held by another job, or any
    other failure to take it) is broadcast and raised on every rank as an S2DError with rank 0's message, so no
    rank is left waiting in a collective. Call on every rank, after torch.distributed is initialised."""
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        with hold_lock(path, what):
            yield
        return
    held, error = None, None
    if torch.distributed.get_rank() == 0:
        held = hold_lock(path, what)
        try:
            held.__enter__()
        except Exception as e:  # noqa: BLE001 - every rank re-raises it below
            held, error = None, (type(e).__name__, str(e))
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        kind, msg = box[0]
        raise (LockHeld if kind == "LockHeld" else S2DError)(msg)
    try:
        yield
    finally:
        if held is not None:
            held.__exit__(None, None, None)
