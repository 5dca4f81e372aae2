"""Reward worker process: compares one extracted answer with one gold answer using math-verify.

Runs inside a child process started by `pool.VerifierPool` (forkserver or spawn). Protocol over a duplex
`multiprocessing` connection:
  worker -> parent: ("ready", pid) once math-verify is imported;
  parent -> worker: (task_id, pred_text, gold_text, soft_timeout_s), or None to exit;
  worker -> parent: (task_id, score, status) with status in {"ok", "no_parse", "soft_timeout", "error"}.

Two time limits protect the parent: a soft one here (`setitimer` raising a BaseException, which math-verify's own
`except Exception` handlers cannot swallow) lets the worker survive a slow pure-Python comparison; the parent's hard
deadline kills the process when sympy is stuck in C code where no signal handler runs. math-verify's own
signal-based timeouts are disabled (they use whole seconds and the parent's deadline covers them). An address-space
limit (`MEMORY_HEADROOM_BYTES` above the size at start) turns runaway allocations into a MemoryError.
"""

from __future__ import annotations

import functools
import logging
import os
import signal

MEMORY_HEADROOM_BYTES = 2 << 30


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside the worker; BaseException so library `except Exception` blocks let it through."""


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _SoftTimeout()


def _limit_memory() -> None:
    try:
        import resource

        with open("/proc/self/status") as f:
            vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        limit = vm_kib * 1024 + MEMORY_HEADROOM_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, StopIteration, ValueError):
        pass  # not Linux: no address-space limit, the parent's hard deadline still applies


@functools.lru_cache(maxsize=1)
def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _parse(text: str):
    from math_verify import parse

    # The text is wrapped in \boxed{} so that the LaTeX extractor takes exactly this expression.
    return parse("\\boxed{" + text + "}", extraction_config=_configs(), parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str):
    # Golds repeat across the samples of a GRPO group: parse each once per worker.
    return _parse(text)


def compare(pred_text: str, gold_text: str) -> tuple[float, str]:
    """(1.0 or 0.0, status) for one prediction vs one gold, both bare expressions (no `\\boxed`, no `$`)."""
    from math_verify import verify

    gold = _parse_gold(gold_text)
    pred = _parse(pred_text)
    if not gold or not pred:
        return 0.0, "no_parse"
    return (1.0 if verify(gold, pred, timeout_seconds=None) else 0.0), "ok"


_WARM_UP_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("x=3", "3"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("(1,2)", "[1,2]"),
    ("10\\%", "\\text{ten}"),
    ("a+b", "\\pi"),
)
_warmed_up = False


def warm_up() -> None:
    """Run a few comparisons so lazy imports and sympy caches are paid once, not by the first real task
    (a cold first comparison can take ~1 s, which would eat its whole deadline). Idempotent."""
    global _warmed_up
    if _warmed_up:
        return
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    for pred, gold in _WARM_UP_PAIRS:
        try:
            compare(pred, gold)
        except Exception:
            pass
    _parse_gold.cache_clear()
    _warmed_up = True


def _serve(conn) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if msg is None:
            return
        task_id, pred_text, gold_text, soft_timeout_s = msg
        try:
            signal.setitimer(signal.ITIMER_REAL, max(soft_timeout_s, 1e-3))
            try:
                score, status = compare(pred_text, gold_text)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            score, status = 0.0, "soft_timeout"
        except Exception:  # any parser/sympy failure is a wrong answer, not a crash
            score, status = 0.0, "error"
        try:
            conn.send((task_id, score, status))
        except (EOFError, OSError, BrokenPipeError):
            return


def worker_main(conn) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which kills workers
    signal.signal(signal.SIGALRM, _on_alarm)
    warm_up()  # before announcing readiness, so deadlines exclude imports and first-use costs
    _limit_memory()
    try:
        conn.send(("ready", os.getpid()))
    except (EOFError, OSError, BrokenPipeError):
        return
    _serve(conn)
