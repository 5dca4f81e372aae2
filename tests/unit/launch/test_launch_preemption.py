"""PreemptionHandler on the own process (os.kill), SLURM requeue through a fake scontrol, child shielding, and the
launcher agent forwarding SIGUSR1 to its children."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from megatron_s2d.runtime.preemption import EXIT_PREEMPTED, EXIT_REQUEUED, PreemptionHandler


@pytest.fixture()
def handler():
    h = PreemptionHandler().install()
    yield h
    h.uninstall()


def _deliver(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


def test_no_signal_no_stop(handler):
    assert not handler.should_stop(distributed=False)
    assert handler.local_signals == []


def test_sigusr1_requeues_under_slurm(handler, tmp_path, monkeypatch):
    log = tmp_path / "scontrol.log"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _deliver(signal.SIGUSR1)
    assert handler.should_stop(distributed=False) and handler.requeue_requested
    assert handler.local_signals == ["SIGUSR1"]
    assert handler.finish(rank=1, distributed=False) == EXIT_PREEMPTED  # only rank 0 requeues
    assert not log.exists()
    assert handler.finish(rank=0, distributed=False) == EXIT_REQUEUED
    assert log.read_text().split() == ["requeue", "4242"]


def test_sigterm_stops_without_requeue(handler, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _deliver(signal.SIGTERM)
    assert handler.should_stop(distributed=False) and not handler.requeue_requested
    assert handler.finish(rank=0, distributed=False) == EXIT_PREEMPTED


def test_requeue_impossible_outside_slurm(handler, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _deliver(signal.SIGUSR1)
    assert handler.finish(rank=0, distributed=False) == EXIT_PREEMPTED


def test_uninstall_restores_previous_handlers():
    seen = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        h = PreemptionHandler().install()
        assert signal.getsignal(signal.SIGUSR1) != prev
        h.uninstall()
        _deliver(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, prev)


def test_install_outside_main_thread_is_refused():
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, PreemptionHandler().install)))
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0].value)


def test_shielded_children_ignore_sigusr1(handler, tmp_path):
    code = "import time; time.sleep(30)"
    with PreemptionHandler.shield_children():
        shielded = subprocess.Popen([sys.executable, "-c", code])
    plain = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        shielded.send_signal(signal.SIGUSR1)
        plain.send_signal(signal.SIGUSR1)
        assert plain.wait(timeout=10) == -signal.SIGUSR1  # default action: killed
        time.sleep(0.3)
        assert shielded.poll() is None  # blocked: still alive
    finally:
        shielded.kill()
        shielded.wait()
    assert not handler.should_stop(distributed=False)  # the parent's own state is untouched


def test_agent_forwards_sigusr1_to_its_workers(tmp_path):
    """The agent's handler (used as torchrun's SIGUSR1 handler) survives the signal and passes it to its children."""
    flag = tmp_path / "child_got_it"
    child = (f"import signal, time, pathlib\n"
             f"signal.signal(signal.SIGUSR1, lambda s, f: pathlib.Path({str(flag)!r}).touch())\n"
             f"print('ready', flush=True)\ntime.sleep(20)\n")
    parent = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        from megatron_s2d.launch.agent import forward_to_children
        signal.signal(signal.SIGUSR1, forward_to_children)
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        print("ready", flush=True)
        t0 = time.time()
        while time.time() - t0 < 20 and not __import__("pathlib").Path({str(flag)!r}).exists():
            time.sleep(0.05)
        p.kill()
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    assert proc.stdout.readline().strip() == "done"
    assert proc.wait(timeout=20) == 0
    assert flag.exists()


@pytest.mark.parametrize("worker_exit, agent_exit", [(75, 75), (2, 2), ("kill", 128 + 9)])
def test_agent_exits_with_the_workers_code(tmp_path, worker_exit, agent_exit):
    """torchrun exits 1 whatever its workers returned; the agent passes the first failure's code on, so the launcher
    and ``s2d status`` can tell a checkpointed stop (75) or bad input (2) from a crash, and name a kill."""
    import subprocess
    import sys

    body = ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)" if worker_exit == "kill"
            else f"import sys; sys.exit({worker_exit})")
    script = tmp_path / "worker.py"
    script.write_text(body + "\n")
    r = subprocess.run([sys.executable, "-m", "megatron_s2d.launch.agent", "--nnodes", "1", "--nproc-per-node", "2",
                        "--standalone", str(script)], capture_output=True, text=True, timeout=180)
    assert r.returncode == agent_exit, r.stderr[-2000:]
