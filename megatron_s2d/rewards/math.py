"""Sparse math reward r(x, y) in {0, 1}: does the final answer of response y equal the gold answer? (math-verify)

    >>> math_reward("... so the area is \\boxed{\\frac{1}{2}}.", "0.5")
    1.0
    >>> score_batch(["\\boxed{3}", "The answer is 4."], ["3", "5"])
    [1.0, 0.0]

Pipeline per response (the grading itself is math-verify's, as the paper scores; the limits are ours):
1. None / non-str / empty -> 0 ("no_answer"). Only the response's tail is graded (`extract.response_tail`: the last
   `RESPONSE_TAIL_CHARS` characters, not starting inside a brace group; the final answer is at the end, and a runaway
   response does not reach the parser whole).
2. `extract.precheck_response`: the tail's `{}` nesting, and every `\\boxed{}` content (and our cheap guess of the final
   answer) for over-long or look-alike-unicode answers -> 0 ("rejected") without parsing.
3. In a worker process with a hard deadline of `timeout_s` per response (`pool.VerifierPool`): math-verify's own
   extraction and comparison, ``verify(parse(gold), parse(response))`` with its LaTeX and expression extraction
   configs, boxed answers first (`_worker.compare`). It reads several `\\boxed{}` as one answer set, "The final answer
   is $X$", the last LaTeX expression without a box, sets, intervals, equations (``x = 3`` vs ``3``), percentages.
   A worker that overruns is killed and replaced, and the response scores 0 ("timeout").
Identical (response tail, gold) pairs of a batch are graded once. There is no in-process fast path: any shortcut
that differs from math-verify on one answer form is a grader disagreement (tests/unit/rewards/test_grader_agrees.py
checks a table of forms against math-verify itself).
A plan's ``grader: hendrycks_boxed`` (``score_batch_with_stats(..., grader=...)``) grades with lm-eval's last-box
string equivalence instead (`rewards.hendrycks`), in process; golds are read the same way.
Gold answers are trusted dataset labels: they must be non-empty strings (ints are accepted and converted);
a `\\boxed{}` or `$...$` around a gold is removed; a gold written as several boxes (`\\boxed{1}\\boxed{2}`) is a set,
as math-verify parses it (`extract.gold_answer_text`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from megatron_s2d.errors import S2DError
from megatron_s2d.rewards.extract import gold_answer_text, precheck_response, response_tail
from megatron_s2d.rewards.hendrycks import hendrycks_grade
from megatron_s2d.rewards.pool import get_pool

OUTCOMES = ("correct", "wrong", "no_answer", "rejected", "no_parse", "timeout", "crashed", "error")
GRADERS = ("math_verify", "hendrycks_boxed")
"""What can grade a response (a plan's ``grader``): math-verify (this module, the default) or lm-eval's Hendrycks
last-box string equivalence (`rewards.hendrycks`, the grader of the authors' public OPD code)."""


@dataclass
class RewardStats:
    """Counts for one scored batch. `outcomes` maps each label in `OUTCOMES` to a count."""

    n: int = 0
    wall_s: float = 0.0
    n_worker: int = 0
    """Decided by a worker process (identical (answer, gold) pairs within a batch share one worker call)."""
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def n_correct(self) -> int:
        return self.outcomes["correct"]

    @property
    def n_timeout(self) -> int:
        return self.outcomes["timeout"]

    @property
    def problems_per_s(self) -> float:
        """Throughput: responses scored per second of wall time."""
        return self.n / self.wall_s if self.wall_s > 0 else float("inf")


@dataclass
class BatchResult:
    scores: list[float]
    """1.0 / 0.0 per response, input order."""
    outcomes: list[str]
    """Outcome label per response (one of `OUTCOMES`)."""
    stats: RewardStats


def _gold_text(gold: object, index: int) -> str:
    if isinstance(gold, bool) or not isinstance(gold, (str, int)):
        raise S2DError(f"golds[{index}]: gold answer must be a str (or int), got {type(gold).__name__}")
    text = gold_answer_text(str(gold))
    if not text:
        raise S2DError(f"golds[{index}]: gold answer is empty")
    return text


def default_workers() -> int:
    """Worker processes used when `workers=None`: the CPUs this process may run on, capped at 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def score_batch_with_stats(
    responses: list, golds: list, timeout_s: float = 1.0, workers: int | None = None, grader: str = "math_verify"
) -> BatchResult:
    """Score `responses[i]` against `golds[i]` in parallel over the worker pool; see the module docstring.
    ``grader="hendrycks_boxed"``: lm-eval's last-box string equivalence instead (`rewards.hendrycks`), in this process
    on the whole response (pure string operations, linear in its length: no pool, no deadline needed)."""
    if grader not in GRADERS:
        raise S2DError(f"score_batch: grader = {grader!r} is not one of {list(GRADERS)}")
    if len(responses) != len(golds):
        raise S2DError(f"score_batch: {len(responses)} responses but {len(golds)} golds")
    if timeout_s <= 0:
        raise S2DError(f"score_batch: timeout_s must be > 0, got {timeout_s}")
    t0 = time.perf_counter()
    gold_texts = [_gold_text(g, i) for i, g in enumerate(golds)]
    n = len(responses)
    scores = [0.0] * n
    outcomes = ["no_answer"] * n
    stats = RewardStats(n=n)
    to_worker: list[int] = []
    tasks: list[tuple[str, str]] = []
    for i, (response, gold) in enumerate(zip(responses, gold_texts)):
        if not isinstance(response, str) or not response.strip():
            continue
        if grader == "hendrycks_boxed":
            scores[i], outcomes[i] = hendrycks_grade(response, gold)
            continue
        tail = response_tail(response)
        if not tail.strip():
            continue
        if precheck_response(tail) is not None:
            outcomes[i] = "rejected"
            continue
        to_worker.append(i)
        tasks.append((tail, gold))
    if tasks:
        n_workers = default_workers() if workers is None else workers
        if n_workers < 1:
            raise S2DError(f"score_batch: workers must be >= 1, got {workers}")
        # Samples of one GRPO group may repeat a response: send each distinct (response, gold) pair once.
        unique = list(dict.fromkeys(tasks))
        by_pair = dict(zip(unique, get_pool().run(unique, timeout_s, n_workers)))
        for i, pair in zip(to_worker, tasks):
            res = by_pair[pair]
            scores[i] = res.score
            if res.status == "ok":
                outcomes[i] = "correct" if res.score == 1.0 else "wrong"
            elif res.status == "no_parse":
                outcomes[i] = "no_answer"
            elif res.status == "soft_timeout":
                outcomes[i] = "timeout"
            else:
                outcomes[i] = res.status
    stats.n_worker = len(tasks)
    for label in outcomes:
        stats.outcomes[label] += 1
    stats.wall_s = time.perf_counter() - t0
    return BatchResult(scores=scores, outcomes=outcomes, stats=stats)


def score_batch(responses: list, golds: list, timeout_s: float = 1.0, workers: int | None = None,
                grader: str = "math_verify") -> list[float]:
    """1.0/0.0 per (response, gold) pair, in input order. `timeout_s` is the hard limit per response."""
    return score_batch_with_stats(responses, golds, timeout_s=timeout_s, workers=workers, grader=grader).scores


def math_reward(response: str, gold: str, timeout_s: float = 1.0) -> float:
    """1.0 if the final answer of `response` equals `gold` (math-verify), else 0.0. Never takes much longer than
    `timeout_s` once the worker pool is up (the first call also starts a worker, ~1 s)."""
    return score_batch_with_stats([response], [gold], timeout_s=timeout_s, workers=1).scores[0]
