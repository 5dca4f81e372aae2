"""Evaluation metrics over k sampled responses per problem: avg@k with its standard error, pass@k, and the paired
difference of two routes on the same problems.

Input `correct` is a list over problems of lists over samples, (n_problems, k), of 0/1 rewards (floats or bools;
any value in [0, 1] is accepted, so partial credit averages the same way).

- avg@k (the paper's metric) = mean over problems of s_i, with s_i = (sum_j correct[i][j]) / k.
- Standard error (across problems, the sampling unit of a benchmark) = std(s_i, ddof=1) / sqrt(n).
  With a single problem it is undefined and reported as NaN (not 0, which would claim certainty).
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) for n samples of which c are
  correct, averaged over problems. An extra, not used by the paper's tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_s2d.errors import S2DError


@dataclass(frozen=True)
class AvgAtK:
    mean: float
    """avg@k in [0, 1]."""
    stderr: float
    """Standard error of `mean` across problems (NaN when n_problems == 1)."""
    n_problems: int
    k: int

    def __str__(self) -> str:
        return f"avg@{self.k} = {100 * self.mean:.2f} ± {100 * self.stderr:.2f} (n={self.n_problems})"


def _as_list(x: object) -> list | None:
    """list(x) for list-likes (lists, tuples, numpy arrays, tensors); None for str/bytes/dict/scalars."""
    if isinstance(x, (str, bytes, dict)) or not hasattr(x, "__len__") or not hasattr(x, "__iter__"):
        return None
    return list(x)


def _as_float(v: object) -> float | None:
    """float(v) for real numbers incl. numpy/torch scalars and bools; None for strings and non-numbers."""
    if isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _validated(correct: Sequence[Sequence[float]]) -> tuple[list[list[float]], int]:
    """Rows as floats and the common k; S2DError naming the problem (and sample) index otherwise."""
    problems = _as_list(correct)
    if not problems:
        raise S2DError("metrics: `correct` must be a non-empty list over problems of lists over samples")
    rows: list[list[float]] = []
    k = 0
    for i, raw in enumerate(problems):
        row = _as_list(raw)
        if not row:
            raise S2DError(f"metrics: problem {i}: expected a non-empty list of sample scores, got {raw!r:.60}")
        if i == 0:
            k = len(row)
        elif len(row) != k:
            raise S2DError(f"metrics: problem {i} has {len(row)} samples but problem 0 has {k}; k must be equal")
        vals = []
        for j, v in enumerate(row):
            fv = _as_float(v)
            if fv is None or not math.isfinite(fv) or not 0.0 <= fv <= 1.0:
                raise S2DError(f"metrics: problem {i}, sample {j}: score must be a number in [0, 1], got {v!r}")
            vals.append(fv)
        rows.append(vals)
    return rows, k


def _mean_and_stderr(xs: Sequence[float]) -> tuple[float, float]:
    """Mean of per-problem values and its standard error, std (ddof=1) / sqrt(n); NaN when n == 1. xs: (n,), n >= 1."""
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, float("nan")
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def avg_at_k(correct: Sequence[Sequence[float]]) -> AvgAtK:
    """avg@k and its standard error across problems. correct: (n_problems, k) 0/1 scores."""
    rows, k = _validated(correct)
    mean, stderr = _mean_and_stderr([sum(r) / k for r in rows])  # per-problem scores, (n,)
    return AvgAtK(mean=mean, stderr=stderr, n_problems=len(rows), k=k)


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct (Chen et al. 2021, numerically stable
    product form: 1 - prod_{i=n-c+1}^{n} (1 - k / i))."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise S2DError(f"pass@k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(correct: Sequence[Sequence[float]], k: int) -> float:
    """Mean unbiased pass@k over problems. correct: (n_problems, n_samples) with 0/1 entries, n_samples >= k."""
    rows, n = _validated(correct)
    for i, row in enumerate(rows):
        if any(v not in (0.0, 1.0) for v in row):
            raise S2DError(f"pass@k: problem {i}: scores must be 0 or 1")
    if not 1 <= k <= n:
        raise S2DError(f"pass@k: k must be in [1, {n}] (samples per problem), got {k}")
    return math.fsum(pass_at_k_single(n, int(sum(r)), k) for r in rows) / len(rows)


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    """mean over problems of (score_a - score_b), in [-1, 1]."""
    stderr: float
    """Standard error of `mean`: std of the per-problem differences (ddof=1) / sqrt(n); NaN when n == 1."""
    n_problems: int

    def __str__(self) -> str:
        return f"{100 * self.mean:+.2f} ± {100 * self.stderr:.2f} (n={self.n_problems})"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Route a minus route b on the same problems (same order): the mean per-problem difference and its paired
    standard error. a, b: (n_problems,) per-problem scores (avg@k's s_i). Pairing removes the between-problem
    variance that both routes share, so the difference is resolved far better than by the two means' own errors."""
    xs, ys = _as_list(a), _as_list(b)
    if not xs or ys is None or len(xs) != len(ys):
        raise S2DError(f"paired difference: need two equally long non-empty lists of per-problem scores, got "
                       f"{len(xs or [])} and {len(ys or [])}")
    mean, stderr = _mean_and_stderr([float(x) - float(y) for x, y in zip(xs, ys)])
    return PairedDifference(mean, stderr, len(xs))


@dataclass(frozen=True)
class GraderAgreement:
    """How often two graders give the same verdict on the same samples (``s2d eval --grader both``)."""

    a: str
    b: str
    n_samples: int
    n_agree: int
    only_a: int
    """Samples grader ``a`` calls correct and ``b`` wrong."""
    only_b: int
    """Samples grader ``b`` calls correct and ``a`` wrong."""

    @property
    def rate(self) -> float:
        """n_agree / n_samples (NaN with no samples)."""
        return self.n_agree / self.n_samples if self.n_samples else float("nan")

    def as_dict(self) -> dict:
        return {"graders": [self.a, self.b], "n_samples": self.n_samples, "agreement_rate": self.rate,
                "correct_only_by": {self.a: self.only_a, self.b: self.only_b}}

    def __str__(self) -> str:
        return (f"{self.a} and {self.b} agree on {100 * self.rate:.1f}% of {self.n_samples} samples; correct only by "
                f"{self.a}: {self.only_a}, only by {self.b}: {self.only_b}")


def grader_agreement(a: str, scores_a: Sequence[float], b: str, scores_b: Sequence[float]) -> GraderAgreement:
    """Agreement of grader ``a`` and grader ``b`` on the same samples: flat 0/1 verdicts, same order."""
    xs, ys = _as_list(scores_a), _as_list(scores_b)
    if xs is None or ys is None or len(xs) != len(ys):
        raise S2DError(f"grader agreement: need two equally long lists of per-sample verdicts, got "
                       f"{len(xs or [])} and {len(ys or [])}")
    pa, pb = [float(x) > 0.5 for x in xs], [float(y) > 0.5 for y in ys]
    return GraderAgreement(a, b, len(pa), sum(x == y for x, y in zip(pa, pb)),
                           sum(x and not y for x, y in zip(pa, pb)), sum(y and not x for x, y in zip(pa, pb)))
