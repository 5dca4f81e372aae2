"""Reward worker process: grades one response against one gold answer with math-verify's own extraction.

Started by `pool.VerifierPool` as ``python -m megatron_s2d.rewards._worker FD`` (a fresh interpreter: nothing of
the caller's ``__main__`` is imported, so any script can score, with or without an ``if __name__ == "__main__":``
guard). Protocol over the duplex `multiprocessing.connection.Connection` on socket FD:
  worker -> parent: ("ready", pid) once math-verify is imported and warmed up;
  parent -> worker: (task_id, response_text, gold_text, soft_timeout_s), or None to exit;
  worker -> parent: (task_id, score, status) with status in {"ok", "no_parse", "soft_timeout", "error"}.

Grading is math-verify's, as its docs and lighteval's MATH / AIME metrics use it: the response is parsed with
``[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]`` (boxed answers first, all boxes of the
response together; then "final answer is $X$" anchors; then the last LaTeX expression / number), the gold (wrapped
in ``\boxed{}``, or as written when it is several boxes: a set) with ``LatexExtractionConfig(boxed_match_priority=0)``,
and ``verify(gold, prediction)`` compares them (numbers, fractions, sets, intervals, equations vs values, percentages,
units).

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

    prediction = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    gold = (LatexExtractionConfig(boxed_match_priority=0),)
    return prediction, gold


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str):
    # Golds repeat across the samples of a GRPO group: parse each once per worker. A bare expression is boxed; a gold
    # that still holds its boxes (several of them: `extract.gold_answer_text`) is parsed as written, so math-verify
    # reads the boxes together as one set (``\\boxed{1}\\boxed{2}`` -> {1, 2}, which ``\\boxed{1,2}`` matches)
    from math_verify import parse

    from megatron_s2d.rewards.extract import is_box_set

    boxed = text if is_box_set(text) else "\\boxed{" + text + "}"
    return parse(boxed, extraction_config=_configs()[1], parsing_timeout=None)


def compare(response: str, gold_text: str) -> tuple[float, str]:
    """(1.0 or 0.0, status) for one response (its tail) vs one gold answer (a bare expression)."""
    from math_verify import parse, verify

    gold = _parse_gold(gold_text)
    pred = parse(response, extraction_config=_configs()[0], parsing_timeout=None)
    if not gold or not pred:
        return 0.0, "no_parse"
    return (1.0 if verify(gold, pred, timeout_seconds=None) else 0.0), "ok"


_WARM_UP_PAIRS = (
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("The final answer is $x=3$.", "3"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{(1,2)}", "[1,2]"),
    ("\\boxed{10\\%}", "\\text{ten}"),
    ("$a+b$", "\\pi"),
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


def _parent_watch() -> None:
    """Exit when the parent is gone even if it could not close our socket (a SIGKILLed parent does close it; this
    is the belt to those braces): the worker runs in a session of its own, so no signal reaches it with the parent's."""
    import threading

    parent = os.getppid()

    def watch():
        import time

        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


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


if __name__ == "__main__":  # python -m megatron_s2d.rewards._worker FD
    import sys
    from multiprocessing.connection import Connection

    _parent_watch()
    worker_main(Connection(int(sys.argv[1])))
