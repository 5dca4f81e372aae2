"""The one engine-vs-trainer mismatch implementation (``stages.steps``): ``logprob_mismatch`` against a slow
per-token reference, and the step metrics the loops log from it."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_s2d.errors import InternalError
from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.stages.steps import logprob_mismatch, mismatch_metrics


def _reference(engine, trainer, mask) -> dict[str, float]:
    diffs = [float(t) - float(e) for e, t, m in zip(engine.flatten(), trainer.flatten(), mask.flatten()) if m]
    n = len(diffs)
    return {
        "mean_abs_diff": sum(abs(d) for d in diffs) / n,
        "max_abs_diff": max(abs(d) for d in diffs),
        "mean_diff": sum(diffs) / n,
        "ratio_mean_minus_1": sum(math.exp(d) for d in diffs) / n - 1.0,
        "k3_kl": sum(math.exp(d) - 1.0 - d for d in diffs) / n,
        "n_tokens": float(n),
    }


def test_matches_reference_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(0)
    engine = -torch.rand(3, 7, generator=g) * 4  # (B, T)
    trainer = engine + 0.1 * torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    got = logprob_mismatch(engine, trainer, mask)
    want = _reference(engine.double(), trainer.double(), mask)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    # garbage (even NaN) under the mask changes nothing; a float mask works like a bool one
    junk = engine.clone()
    junk[~mask] = float("nan")
    assert logprob_mismatch(junk, trainer, mask.float()) == got


def test_identical_logprobs_give_zero_and_k3_is_positive():
    lp = torch.log_softmax(torch.randn(2, 5), -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    same = logprob_mismatch(lp, lp, mask)
    assert all(same[k] == 0.0 for k in ("mean_abs_diff", "max_abs_diff", "mean_diff", "ratio_mean_minus_1", "k3_kl"))
    shifted = logprob_mismatch(lp, lp + 0.2, mask)
    assert shifted["k3_kl"] == pytest.approx(math.exp(0.2) - 1.2) and shifted["k3_kl"] > 0
    assert shifted["max_abs_diff"] == pytest.approx(0.2, abs=1e-6)


def test_k3_estimates_kl_between_distributions():
    # tokens sampled from the engine distribution p; trainer distribution q: mean k3 -> KL(p || q)
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.log(p) + 0.3 * torch.randn(6, generator=g), 0)
    tok = torch.multinomial(p, 200_000, replacement=True, generator=g)[None]  # (1, N)
    stats = logprob_mismatch(p.log()[tok], q.log()[tok], torch.ones_like(tok, dtype=torch.bool))
    kl = float((p * (p.log() - q.log())).sum())
    assert stats["k3_kl"] == pytest.approx(kl, rel=0.05)
    assert abs(stats["ratio_mean_minus_1"]) < 0.01  # E_p[q/p] = 1


def test_shape_mismatch_is_our_bug_and_an_empty_share_gives_zeros():
    a = torch.zeros(2, 3)
    with pytest.raises(InternalError, match="shapes differ"):
        logprob_mismatch(a, torch.zeros(2, 4), torch.ones(2, 3))
    empty = logprob_mismatch(a, a + 1.0, torch.zeros(2, 3))  # a rank whose share of the step has no tokens
    assert set(empty.values()) == {0.0}
    bad = a.clone()
    bad[0, 0] = float("inf")
    assert math.isinf(logprob_mismatch(a, bad, torch.ones(2, 3))["max_abs_diff"])  # shown, not hidden


def test_step_metrics_are_the_statistics_on_the_loss_tokens():
    batch = RolloutBatch.from_rows([[1, 2], [3]], [[4, 5, 6], [7]], [[-0.5, -1.0, -2.0], [-0.25]], pad_id=0)
    trainer = batch.engine_logprobs + batch.loss_mask * torch.tensor([[0, 0, 0.1, -0.3, 0.2], [0, 0.4, 0, 0, 0]])
    trainer = trainer.masked_fill(batch.loss_mask == 0, float("nan"))  # padding and prompt positions never enter
    got = mismatch_metrics(batch, trainer)
    d = [0.1, -0.3, 0.2, 0.4]
    assert got["logprob_mismatch_mean"] == pytest.approx(sum(abs(x) for x in d) / 4)
    assert got["logprob_mismatch_max"] == pytest.approx(0.4)
    assert got["logprob_mismatch_k3_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 4)
