"""avg@k / standard error / pass@k against slow, obvious reference implementations."""

import itertools
import math
import random
import statistics

import numpy as np
import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.eval import avg_at_k, pass_at_k, pass_at_k_single


def _ref_avg_at_k(correct):
    scores = []
    for row in correct:
        total = 0
        for v in row:
            total += v
        scores.append(total / len(row))
    mean = sum(scores) / len(scores)
    stderr = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
    return mean, stderr


def _ref_pass_at_k(n, c, k):
    """Probability that a random k-subset of the n samples contains a correct one, by enumeration."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("seed", range(5))
def test_avg_at_k_matches_reference(seed):
    rng = random.Random(seed)
    n, k = rng.randint(2, 40), rng.randint(1, 16)
    correct = [[float(rng.random() < rng.random()) for _ in range(k)] for _ in range(n)]
    res = avg_at_k(correct)
    mean, stderr = _ref_avg_at_k(correct)
    assert res.n_problems == n and res.k == k
    assert res.mean == pytest.approx(mean, abs=1e-12)
    assert res.stderr == pytest.approx(stderr, abs=1e-12)


def test_avg_at_k_known_values():
    res = avg_at_k([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # per problem 0.5, 1, 0
    assert res.mean == pytest.approx(0.5)
    assert res.stderr == pytest.approx(0.5 / math.sqrt(3))  # sample std of (0.5, 1, 0) is 0.5
    assert "avg@4 = 50.00" in str(res)


def test_single_problem_stderr_is_nan_and_accepts_arrays():
    res = avg_at_k(np.array([[True, False, True, True]]))
    assert res.mean == 0.75 and math.isnan(res.stderr)
    assert avg_at_k([np.array([1.0, 0.0]), (1, 1)]).mean == 0.75


@pytest.mark.parametrize(
    "correct, match",
    [
        ([[1, 0], [1, 0, 1]], "problem 1 has 3 samples but problem 0 has 2"),
        ([[1, 0], [1, 2]], r"problem 1, sample 1: .*\[0, 1\]"),
        ([[1, 0], [float("nan"), 0]], "problem 1, sample 0"),
        ([[1], []], "problem 1: expected a non-empty list"),
        ([], "non-empty"),
        ([[1, "1"]], "problem 0, sample 1"),
    ],
)
def test_avg_at_k_validation(correct, match):
    with pytest.raises(S2DError, match=match):
        avg_at_k(correct)


@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_single_matches_enumeration(n, c, k):
    assert pass_at_k_single(n, c, k) == pytest.approx(_ref_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_mean_and_relation_to_avg():
    correct = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    expected = (_ref_pass_at_k(4, 2, 2) + 0.0 + 1.0) / 3
    assert pass_at_k(correct, 2) == pytest.approx(expected)
    assert pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct).mean)  # pass@1 == avg@k
    with pytest.raises(S2DError, match="k must be in"):
        pass_at_k(correct, 5)
    with pytest.raises(S2DError, match="0 or 1"):
        pass_at_k([[0.5, 1]], 1)


def test_grader_agreement_counts_each_direction():
    from megatron_s2d.eval.metrics import grader_agreement

    a = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    b = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    ag = grader_agreement("math_verify", a, "hendrycks_boxed", b)
    assert (ag.n_samples, ag.n_agree, ag.only_a, ag.only_b) == (6, 3, 2, 1)
    assert ag.rate == 0.5
    assert ag.as_dict() == {"graders": ["math_verify", "hendrycks_boxed"], "n_samples": 6, "agreement_rate": 0.5,
                            "correct_only_by": {"math_verify": 2, "hendrycks_boxed": 1}}
    assert "agree on 50.0% of 6 samples" in str(ag)
    assert math.isnan(grader_agreement("a", [], "b", []).rate)
    with pytest.raises(S2DError, match="equally long"):
        grader_agreement("a", [1.0], "b", [1.0, 0.0])
