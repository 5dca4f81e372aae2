"""Lock edges: a lock file that is not ours to write (another user's run folder) still names a live holder, and
refuses clearly when nobody holds it; the holder's description survives a garbled lock file."""

import builtins
import subprocess
import sys

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.runtime import locks
from megatron_s2d.runtime.locks import LockHeld, hold_lock

HOLD = """
import sys, time
from megatron_s2d.runtime.locks import hold_lock
with hold_lock(sys.argv[1], "run folder /x"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def read_only(monkeypatch):
    """Opening the lock file for writing is refused, as for a file of another user (tests run as root)."""
    real_open = builtins.open

    def fake_open(path, mode="r", *a, **k):
        if "a" in mode or "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(locks, "open", fake_open, raising=False)


def test_not_ours_and_free(tmp_path, read_only):
    lock = tmp_path / "LOCK"
    lock.write_text("")
    with pytest.raises(S2DError, match="belongs to uid .* not yours to write: use a run_dir of your own"):
        with hold_lock(lock, "run folder /x"):
            pass


def test_not_ours_and_held_names_the_holder(tmp_path, monkeypatch):
    lock = tmp_path / "LOCK"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        real_open = builtins.open
        monkeypatch.setattr(locks, "open", lambda p, mode="r", *a, **k: (
            (_ for _ in ()).throw(PermissionError(13, "denied")) if "a" in mode else real_open(p, mode, *a, **k)),
            raising=False)
        with pytest.raises(LockHeld, match=f"run folder /x is in use by pid {proc.pid}"):
            with hold_lock(lock, "run folder /x"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_missing_and_unreadable_lock_file(tmp_path, read_only):
    with pytest.raises(S2DError, match="cannot open the lock file"):
        with hold_lock(tmp_path / "nope" / "LOCK", "stage 'a'"):
            pass


def test_garbled_lock_file_is_taken_over(tmp_path):
    lock = tmp_path / "LOCK"
    lock.write_bytes(b"\xff\xfe garbage")
    with hold_lock(lock, "stage 'a'") as info:
        assert '"pid"' in lock.read_text() and info["user"]
    assert lock.read_text() == ""
