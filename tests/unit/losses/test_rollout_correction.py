"""Rollout importance-sampling corrections against slow references, and the exact no-op when the engine and the
trainer agree (every mode, and through the clipped policy gradient: the same loss and gradient as no correction)."""

import math

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses import RolloutCorrection, clipped_pg_loss, rollout_is_weights

B, T = 3, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    engine = old + torch.randn(B, T, generator=g) * 0.6
    mask = torch.ones(B, T)
    mask[0, :2] = 0
    mask[2, 4:] = 0
    return old, engine, mask


def _ref(old, engine, mask, c: RolloutCorrection):
    """Per-token Python reference."""
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        logs = [float(old[b, t] - engine[b, t]) for t in toks]
        seq = math.exp(sum(logs) / max(len(logs), 1))
        for t, lr in zip(toks, logs):
            r = math.exp(lr)
            if c.mode == "tis":
                out[b, t] = min(r, c.tis_cap)
            elif c.mode == "mis":
                out[b, t] = 1.0 if c.low <= seq <= c.high else 0.0
            elif c.mode == "icepop":
                out[b, t] = r if c.low <= r <= c.high else 0.0
            else:
                out[b, t] = 1.0
    return out


@pytest.mark.parametrize("mode", ["none", "tis", "mis", "icepop"])
def test_weights_match_reference(mode):
    old, engine, mask = _inputs()
    band = (0.97, 1.03) if mode == "mis" else (0.6, 1.6)  # a sequence's geometric mean is close to 1
    c = RolloutCorrection(mode=mode, tis_cap=1.5, low=band[0], high=band[1])
    w, m = rollout_is_weights(old, engine, mask, c)
    torch.testing.assert_close(w.double(), _ref(old, engine, mask, c), rtol=1e-5, atol=1e-6)
    assert m["is_masked_count"] == float(((mask != 0) & (w == 0)).sum())
    assert m["is_weight_sum"] == pytest.approx(float(w.sum()), rel=1e-6)
    if mode in ("mis", "icepop"):
        assert m["is_masked_count"] > 0  # the band cut something in this draw


@pytest.mark.parametrize("mode", ["tis", "mis", "icepop"])
def test_identical_log_probs_are_an_exact_no_op(mode):
    old, _, mask = _inputs()
    c = RolloutCorrection(mode=mode, tis_cap=1.0, low=1.0, high=1.0)  # the tightest settings still pass ratio 1
    w, m = rollout_is_weights(old, old.clone(), mask, c)
    assert torch.equal(w, mask)  # exactly 1 on loss tokens
    lp = (old + 0.1).requires_grad_(True)
    adv = torch.randn(B)
    base, _ = clipped_pg_loss(lp, old, adv, mask, global_num_tokens=10.0)
    corrected, _ = clipped_pg_loss(lp, old, adv, mask, global_num_tokens=10.0, is_weights=w)
    g0 = torch.autograd.grad(base, lp)[0]
    g1 = torch.autograd.grad(corrected, lp)[0]
    assert torch.equal(base, corrected) and torch.equal(g0, g1)


def test_weights_scale_the_clipped_term_per_token():
    old, engine, mask = _inputs(1)
    lp = old.clone().requires_grad_(True)
    adv = torch.ones(B)
    w, _ = rollout_is_weights(old, engine, mask, RolloutCorrection(mode="tis", tis_cap=2.0))
    loss, _ = clipped_pg_loss(lp, old, adv, mask, global_num_tokens=1.0, is_weights=w)
    grad = torch.autograd.grad(loss, lp)[0]  # d(-ratio * A * w)/d lp = -w at ratio 1
    torch.testing.assert_close(grad, -w)


def test_bad_settings_are_refused():
    with pytest.raises(S2DError, match="mode"):
        RolloutCorrection(mode="sometimes")
    with pytest.raises(S2DError, match="low <= 1 <= high"):
        RolloutCorrection(mode="mis", low=1.2, high=2.0)
