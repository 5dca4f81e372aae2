"""The math reward end to end: math-verify equivalence, fallbacks, adversarial inputs under a hard deadline."""

import time

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.rewards import math_reward, score_batch, score_batch_with_stats, shutdown_pool
from megatron_s2d.rewards import pool as pool_mod

# CI has 2 slow, shared cores: the target is ~1 s per adversarial case, the assertion bound is generous.
WALL_BOUND_S = 5.0
# Deadline for legitimate comparisons (10-100 ms on an idle core) in tests that do not test the deadline itself:
# generous, so an overloaded CI machine does not turn a slow correct answer into a timeout.
LEGIT_TIMEOUT_S = 3.0


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    pool_mod.get_pool().warm_up(2)  # start-up (~2 s) is paid once, outside the per-case timings
    yield
    shutdown_pool()


CORRECTNESS = [
    ("so $\\boxed{0.5}$", "\\frac12", 1.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("\\boxed{1/2}", "0.5", 1.0),
    ("\\boxed{\\dfrac12}", "$\\frac{1}{2}$", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{3}", "$x=3$", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{042}", "42", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("Answer: $\\frac{3}{4}$", "0.75", 1.0),
    ("we end with\n7/8", "\\frac{7}{8}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac12", 0.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}", 0.0),
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{(2, 1)}", "(1,2)", 0.0),
    ("The answer is 41.", "42", 0.0),
    ("I don't know.", "42", 0.0),
]


def test_correctness_batch_order_preserved():
    responses, golds, expected = zip(*CORRECTNESS)
    res = score_batch_with_stats(list(responses), list(golds), timeout_s=LEGIT_TIMEOUT_S)
    assert res.scores == list(expected), [
        (r, g, s) for (r, g, e), s in zip(CORRECTNESS, res.scores) if s != e
    ]
    assert res.stats.n == len(CORRECTNESS)
    assert res.stats.n_correct == sum(expected)
    assert res.stats.outcomes["no_answer"] == 1
    assert res.stats.n_worker == len(CORRECTNESS)  # every non-empty response is graded by math-verify


def test_reverse_order_gives_reversed_scores():
    responses, golds, expected = zip(*CORRECTNESS)
    assert score_batch(list(responses[::-1]), list(golds[::-1]), timeout_s=LEGIT_TIMEOUT_S) == list(expected[::-1])


def test_math_reward_single():
    gold = "\\frac{\\sqrt3}{2}"
    assert math_reward("Thus \\boxed{\\frac{\\sqrt{3}}{2}}.", gold, timeout_s=LEGIT_TIMEOUT_S) == 1.0
    assert math_reward("Thus \\boxed{\\frac{\\sqrt{3}}{3}}.", gold, timeout_s=LEGIT_TIMEOUT_S) == 0.0


ADVERSARIAL = {
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "factorial": "\\boxed{100000!}",
    "factorial_of_googol": "\\boxed{(10^{100})!}",
    "huge_power": "\\boxed{10^{10^{10}}}",
    "deep_frac": "\\boxed{" + "\\frac{" * 3000 + "1}{2}" * 3000 + "}",
    "one_megabyte": "7" * 1_000_000,
    "one_megabyte_box": "\\boxed{" + "1+" * 500_000 + "1}",
    "unbalanced": "\\boxed{\\frac{1}{2}",
    "fullwidth_digits": "\\boxed{１}",
    "cyrillic": "\\boxed{х^0}",  # Cyrillic х
    "empty": "",
    "none": None,
    "not_a_string": 1,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_returns_zero_fast(name):
    t0 = time.perf_counter()
    score = math_reward(ADVERSARIAL[name], "1", timeout_s=1.0)
    wall = time.perf_counter() - t0
    assert score == 0.0
    assert wall < WALL_BOUND_S, f"{name} took {wall:.2f} s"


def test_hard_kill_replaces_stuck_worker(monkeypatch):
    """With the worker's own soft timer pushed past the deadline, the parent must kill it."""
    pool = pool_mod.get_pool()
    killed_before = pool.n_killed
    monkeypatch.setattr(pool_mod, "SOFT_TIMEOUT_FRACTION", 100.0)
    t0 = time.perf_counter()
    res = score_batch_with_stats(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{2}"], ["1", "2"], timeout_s=1.0, workers=2)
    assert time.perf_counter() - t0 < WALL_BOUND_S
    assert res.scores == [0.0, 1.0]
    assert res.outcomes == ["timeout", "correct"]
    assert pool.n_killed == killed_before + 1
    monkeypatch.undo()
    # the replacement worker serves the next call
    assert math_reward("\\boxed{\\frac{2}{4}}", "0.5", timeout_s=LEGIT_TIMEOUT_S) == 1.0


def test_worker_dead_while_idle_is_replaced():
    pool = pool_mod.get_pool()
    pool.warm_up(2)
    victim = pool._workers[0].proc
    victim.kill()
    victim.wait(5)
    scores = score_batch(["\\boxed{0.25}", "\\boxed{\\frac14}"], ["\\frac{1}{4}", "0.25"], timeout_s=LEGIT_TIMEOUT_S)
    assert scores == [1.0, 1.0]


def test_batch_with_timeouts_keeps_order():
    responses = ["\\boxed{1}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{2}}", "nothing", "\\boxed{0.5}"]
    golds = ["1", "1", "0.5", "1", "\\frac{1}{3}"]
    res = score_batch_with_stats(responses, golds, timeout_s=2.0, workers=2)
    assert res.scores == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert res.outcomes[1] == "timeout" and res.outcomes[3] == "no_answer"
    assert res.stats.problems_per_s > 0


def test_bad_arguments():
    with pytest.raises(S2DError, match="2 responses but 1 golds"):
        score_batch(["a", "b"], ["1"])
    with pytest.raises(S2DError, match=r"golds\[1\]"):
        score_batch(["a", "b"], ["1", None])
    with pytest.raises(S2DError, match=r"golds\[0\].*empty"):
        score_batch(["a"], [" $ $ "])
    with pytest.raises(S2DError, match="timeout_s"):
        math_reward("\\boxed{1}", "1", timeout_s=0)
    assert score_batch([], []) == []


def test_worker_left_busy_by_interrupted_run_is_discarded():
    """A run interrupted mid-flight (Ctrl-C) leaves a worker busy; the next run must not wait for or misuse it."""
    pool = pool_mod.get_pool()
    pool.warm_up(1)
    w = pool._workers[0]
    w.conn.send(((-1, 0), "9^{9^{9^{9}}}", "1", 30.0))
    w.task, w.deadline = (-1, 0), time.monotonic() + 30.0
    t0 = time.perf_counter()
    scores = score_batch(["\\boxed{0.5}", "\\boxed{3}"], ["\\frac12", "2+1"], timeout_s=LEGIT_TIMEOUT_S, workers=1)
    assert scores == [1.0, 1.0]
    assert time.perf_counter() - t0 < WALL_BOUND_S
