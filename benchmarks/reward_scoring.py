"""Throughput of the math reward (`megatron_s2d.rewards.score_batch`) on a mixed batch, on CPU.

    python benchmarks/reward_scoring.py [--n 500] [--workers N] [--adversarial-frac 0.01] [--timeout 1.0]

The batch mixes what GRPO rollouts look like: correct and wrong boxed answers in many LaTeX forms, plain integers
(AIME-style), responses without a box (math-verify's extraction), no answer at all, and a small
fraction of adversarial answers that need the deadline (huge powers/factorials). Prints problems/s for a clean
batch and for the mixed one, and the outcome counts. No asserts: this reports figures.
"""

from __future__ import annotations

import argparse
import random
import time

from megatron_s2d.rewards import score_batch_with_stats
from megatron_s2d.rewards.math import default_workers
from megatron_s2d.rewards.pool import get_pool

def _item(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, equivalent answer forms, wrong answers) with random numbers, so few pairs repeat in a batch."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.randrange(7)
    if kind == 0:
        return f"\\frac{{{a}}}{{{a * c}}}", [f"\\frac{{1}}{{{c}}}", f"1/{c}", f"\\dfrac{{{2 * a}}}{{{2 * a * c}}}"], [
            f"\\frac{{1}}{{{c + 1}}}"
        ]
    if kind == 1:
        return f"{a}\\sqrt{{{c}}}", [f"\\sqrt{{{a * a * c}}}"], [f"{a + 1}\\sqrt{{{c}}}", f"{a}\\sqrt{{{c + 1}}}"]
    if kind == 2:
        return f"x={a}", [f"{a}", f"x = {a}"], [f"x={a + 1}"]
    if kind == 3:
        return f"({a},{b})", [f"({a}, {b})"], [f"({b},{a + b})", f"[{a},{b}]"]
    if kind == 4:
        return f"{a}\\%", [f"{a}\\%", f"{a}"], [f"{a + 1}\\%"]
    if kind == 5:  # AIME-style integers: decided in-process
        return f"{a * b}", [f"{a * b}", f"0{a * b}"], [f"{a * b + 1}"]
    return f"{a}+{b}\\pi", [f"{b}\\pi+{a}"], [f"{a}-{b}\\pi", f"{a + b}\\pi"]


def _adversarial(rng: random.Random) -> str:
    k = rng.randint(5, 9)
    return rng.choice(
        [f"9^{{9^{{9^{{{k}}}}}}}", f"({k}0^{{100}})!", f"{k}^{{{k}^{{{k}0}}}}", f"\\sqrt{{{k}}}^{{10^{{9}}}}"]
    )


def make_batch(n: int, adversarial_frac: float, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, golds = [], []
    for _ in range(n):
        gold, good, bad = _item(rng)
        roll = rng.random()
        if roll < adversarial_frac:
            resp = f"Therefore \\boxed{{{_adversarial(rng)}}}"
        elif roll < 0.45:
            resp = f"Reasoning... so the result is $\\boxed{{{rng.choice(good)}}}$."
        elif roll < 0.8:
            resp = f"Reasoning... hence \\boxed{{{rng.choice(bad)}}}."
        elif roll < 0.92:
            resp = f"Some steps.\nThe final answer is ${rng.choice(good + bad)}$."
        else:
            resp = "I could not finish the computation because"
        responses.append("Let me think step by step. " * 40 + resp)
        golds.append(gold)
    return responses, golds


def _report(label: str, responses: list[str], golds: list[str], timeout: float, workers: int) -> None:
    res = score_batch_with_stats(responses, golds, timeout_s=timeout, workers=workers)
    s = res.stats
    n_pairs = len({(r, g) for r, g in zip(responses, golds)})
    counts = ", ".join(f"{k}={v}" for k, v in s.outcomes.items() if v)
    print(
        f"{label:<28} n={s.n:5d}  wall={s.wall_s:7.3f} s  {s.problems_per_s:8.1f} problems/s  "
        f"distinct={n_pairs} worker={s.n_worker}  [{counts}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--adversarial-frac", type=float, default=0.01)
    ap.add_argument("--timeout", type=float, default=1.0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    get_pool().warm_up(args.workers)
    print(f"pool start-up ({args.workers} workers): {time.perf_counter() - t0:.2f} s")
    clean = make_batch(args.n, 0.0, seed=1)
    mixed = make_batch(args.n, args.adversarial_frac, seed=2)
    _report("clean (first pass)", *clean, args.timeout, args.workers)
    _report("clean (second pass)", *clean, args.timeout, args.workers)
    _report(f"mixed ({args.adversarial_frac:.0%} adversarial)", *mixed, args.timeout, args.workers)
    print(f"workers killed and replaced so far: {get_pool().n_killed}")


if __name__ == "__main__":
    main()
