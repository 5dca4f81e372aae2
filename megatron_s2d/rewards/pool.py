"""A persistent pool of reward worker processes with a hard, kill-enforced deadline per task.

Why not `multiprocessing.Pool` / `ProcessPoolExecutor`: neither can kill one stuck worker and carry on. sympy can
spin inside C code (huge integer powers, factorials) where no Python signal handler runs, so the only limit that
input cannot defeat is killing the process. Here every worker has its own pipe; a task that is not answered
`timeout_s` after it was sent gets its worker SIGKILLed and replaced, and scores 0.

Each worker is a fresh interpreter, ``python -m megatron_s2d.rewards._worker FD``, talking over a socket pair: never
plain `fork` (unsafe in a process that already runs threads: torch, CUDA), and not `multiprocessing`'s spawn or
forkserver either, whose children re-import the caller's ``__main__`` (a script without an
``if __name__ == "__main__":`` guard then died with "reward worker exited during start-up"). A worker starts in
~1 s (interpreter + math-verify + warm-up; measured in ``benchmarks/RESULTS.md``), runs in a session of its own
(the SIGUSR1 SLURM sends the trainer's process group before the time limit does not reach it), and exits when the
parent goes away (its socket closes).
The pool is created lazily, grows to the requested number of workers, is module-global (`get_pool`), recreated
after a `fork` of the parent, and shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from megatron_s2d.errors import S2DError

WORKER_START_TIMEOUT_S = 120.0
"""A worker that has not announced readiness this long after start is a setup failure (raised, not scored)."""
SOFT_TIMEOUT_FRACTION = 0.8
"""The worker interrupts itself at this fraction of the deadline, which saves a process restart when it can."""
_WORKER_MODULE = "megatron_s2d.rewards._worker"


@dataclass
class TaskResult:
    score: float
    status: str  # ok | no_parse | soft_timeout | error | timeout | crashed


class _Worker:
    def __init__(self) -> None:
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", _WORKER_MODULE, str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.started_at = time.monotonic()
        self.ready = False
        self.task: tuple[int, int] | None = None  # (run id, index in that run's task list)
        self.deadline = 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        try:
            if self.alive():
                self.proc.kill()
            self.proc.wait(timeout=5.0)
        except (OSError, ValueError):
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.wait(timeout=1.0)
        except Exception:  # noqa: BLE001 - already gone, pipe closed, or slow to exit: killed below
            pass
        self.kill()


class VerifierPool:
    """Worker processes that run `_worker.compare` with a hard per-task deadline. Not thread-safe by itself:
    `run` is serialised by a lock."""

    def __init__(self) -> None:
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.pid = os.getpid()
        self.n_killed = 0
        self.n_started = 0
        self._run_id = 0

    @property
    def size(self) -> int:
        return len(self._workers)

    def _start_worker(self) -> _Worker:
        w = _Worker()
        self.n_started += 1
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._start_worker()

    def warm_up(self, workers: int) -> None:
        """Start `workers` processes (if not yet running) and wait until they are ready."""
        with self._lock:
            self._grow(workers)
            while not all(w.ready for w in self._workers):
                self._poll(time.monotonic() + 0.5, {})

    def _grow(self, workers: int) -> None:
        while len(self._workers) < workers:
            self._workers.append(self._start_worker())

    def run(self, tasks: list[tuple[str, str]], timeout_s: float, workers: int) -> list[TaskResult]:
        """Compare each (pred_text, gold_text); results in input order. A task over `timeout_s` scores 0."""
        if timeout_s <= 0:
            raise S2DError(f"timeout_s must be > 0, got {timeout_s}")
        results: list[TaskResult | None] = [None] * len(tasks)
        if not tasks:
            return []
        with self._lock:
            self._run_id += 1
            for w in list(self._workers):
                if w.task is not None:  # left busy by an interrupted run (e.g. KeyboardInterrupt): discard
                    self._replace(w)
            self._grow(max(1, min(workers, len(tasks))))
            pending = list(range(len(tasks) - 1, -1, -1))  # stack: pop() yields tasks in order
            while pending or any(w.task is not None for w in self._workers):
                for w in self._workers:
                    if w.ready and w.task is None and pending:
                        if not w.alive():  # died while idle (OOM killer, ...): never hand it a task
                            self._replace(w)
                            continue
                        i = pending.pop()
                        pred, gold = tasks[i]
                        task_id = (self._run_id, i)
                        try:
                            w.conn.send((task_id, pred, gold, timeout_s * SOFT_TIMEOUT_FRACTION))
                        except (OSError, BrokenPipeError):
                            pending.append(i)
                            self._replace(w)
                            continue
                        w.task, w.deadline = task_id, time.monotonic() + timeout_s
                busy = [w.deadline for w in self._workers if w.task is not None]
                until = min(busy) if busy else time.monotonic() + 0.5
                self._poll(until, results)
                self._enforce_deadlines(results)
        return [r if r is not None else TaskResult(0.0, "crashed") for r in results]

    def _poll(self, until: float, results: dict | list) -> None:
        """Wait for messages until `until`; record results, mark workers ready, replace dead ones."""
        by_conn = {w.conn: w for w in self._workers}
        ready = wait(list(by_conn), timeout=max(0.0, until - time.monotonic()))
        for conn in ready:
            w = by_conn[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._on_death(w, results)
                continue
            if msg[0] == "ready":
                w.ready = True
            elif w.task is not None and msg[0] == w.task:
                results[w.task[1]] = TaskResult(float(msg[1]), str(msg[2]))
                w.task = None
        now = time.monotonic()
        for w in list(self._workers):
            if not w.ready and now - w.started_at > WORKER_START_TIMEOUT_S:
                raise S2DError(
                    f"reward worker did not start within {WORKER_START_TIMEOUT_S:.0f} s; check that "
                    f"'{_WORKER_MODULE}' and math_verify import in a fresh interpreter"
                )

    def _on_death(self, w: _Worker, results) -> None:
        if not w.ready:
            raise S2DError(
                f"reward worker exited during start-up (exit code {w.exitcode}); check that "
                f"'{_WORKER_MODULE}' and math_verify import in a fresh interpreter"
            )
        if w.task is not None:
            results[w.task[1]] = TaskResult(0.0, "crashed")
        self._replace(w)

    def _enforce_deadlines(self, results) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                results[w.task[1]] = TaskResult(0.0, "timeout")
                self.n_killed += 1
                self._replace(w)

    def shutdown(self) -> None:
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers = []


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> VerifierPool:
    """The process-wide pool, created on first use (and again in a forked child, which must not share pipes)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = VerifierPool()
        return _POOL


def shutdown_pool() -> None:
    """Stop all reward workers (also registered with atexit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.shutdown()
        _POOL = None


atexit.register(shutdown_pool)
