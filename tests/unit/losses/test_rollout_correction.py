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
            elif c.mode == "seq_mask_tis":
                out[b, t] = min(r, c.tis_cap) if c.low <= seq <= c.high else 0.0
            elif c.mode == "icepop":
                out[b, t] = r if c.low <= r <= c.high else 0.0
            else:
                out[b, t] = 1.0
    return out


@pytest.mark.parametrize("mode", ["none", "tis", "mis", "seq_mask_tis", "icepop"])
def test_weights_match_reference(mode):
    old, engine, mask = _inputs()
    # a sequence's geometric mean is close to 1 (here 0.78, 0.76, 1.30): seq_mask_tis keeps two rows, rejects one
    band = {"mis": (0.97, 1.03), "seq_mask_tis": (0.77, 1.5)}.get(mode, (0.6, 1.6))
    c = RolloutCorrection(mode=mode, tis_cap=1.5, low=band[0], high=band[1])
    w, m = rollout_is_weights(old, engine, mask, c)
    torch.testing.assert_close(w.double(), _ref(old, engine, mask, c), rtol=1e-5, atol=1e-6)
    assert m["is_masked_count"] == float(((mask != 0) & (w == 0)).sum())
    assert m["is_weight_sum"] == pytest.approx(float(w.sum()), rel=1e-6)
    if mode in ("mis", "seq_mask_tis", "icepop"):
        assert m["is_masked_count"] > 0  # the band cut something in this draw
    if mode == "seq_mask_tis":
        kept = w.sum(-1) > 0
        assert kept.any() and not torch.equal(w[kept], mask[kept])  # kept rows carry their (capped) token ratios


@pytest.mark.parametrize("mode", ["tis", "mis", "seq_mask_tis", "icepop"])
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


def _broken_stretches(n=200, t=2000, seed=0):
    """The issue's numbers: ``n`` sequences of ``t`` tokens whose per-token engine-vs-trainer mismatch is bf16-sized
    noise (log r ~ N(0, 0.01^2)); every 20th sequence (5%) carries a broken stretch: 10% of its tokens, contiguous,
    off by log r = +3 or -3 (alternating). Returns (old, engine, mask, broken rows)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    log_r = torch.randn(n, t, generator=g, dtype=torch.float64) * 0.01
    broken = torch.arange(n) % 20 == 0
    for k, i in enumerate(broken.nonzero().flatten().tolist()):
        start = int(torch.randint(0, t - t // 10, (1,), generator=g))
        log_r[i, start:start + t // 10] += 3.0 if k % 2 == 0 else -3.0
    return old, old - log_r, torch.ones(n, t), broken


def _rejected(c: RolloutCorrection, old, engine, mask, broken) -> tuple[float, float]:
    """(fraction of the broken sequences rejected, fraction of the clean ones rejected)."""
    w, _ = rollout_is_weights(old, engine, mask, c)
    rejected = (w == 0).all(-1)
    return float(rejected[broken].double().mean()), float(rejected[~broken].double().mean())


def test_default_mis_band_rejects_broken_sequences_and_keeps_clean_ones():
    """A geometric mean leaves [0.5, 2] only when the mean per-token log r exceeds ln 2 in size; a broken stretch of
    10% of the tokens moves it by 0.3. The old default band (IcePop's [0.5, 2]) rejected none of the broken
    sequences; the plan's default mis band (verl's geo-RS [0.999, 1.001]) rejects all of them and no clean one, as
    does NeMo-RL's seq-mask-tis band [0.999, 1.002]. Kept sequences get weight 1 under mis (geometric rejection) and
    their capped token ratios under seq_mask_tis."""
    from megatron_s2d.config.schema import RolloutCorrectionConfig
    from megatron_s2d.stages.steps import correction

    data = _broken_stretches()
    default = correction(RolloutCorrectionConfig(mode="mis"))
    assert (default.low, default.high) == (0.999, 1.001)
    assert _rejected(default, *data) == (1.0, 0.0)
    assert _rejected(RolloutCorrection(mode="mis", low=0.999, high=1.002), *data) == (1.0, 0.0)  # NeMo-RL's band
    assert _rejected(RolloutCorrection(mode="mis", low=0.5, high=2.0), *data) == (0.0, 0.0)  # the old default
    old, engine, mask, broken = data
    w, _ = rollout_is_weights(old, engine, mask, default)
    assert torch.equal(w[~broken], mask[~broken])  # kept: weight 1 on every token, no reweighting
    seq_tis = correction(RolloutCorrectionConfig(mode="seq_mask_tis"))
    assert _rejected(seq_tis, *data) == (1.0, 0.0)
    w, _ = rollout_is_weights(old, engine, mask, seq_tis)
    ratio = torch.exp(old - engine)[~broken].clamp(max=seq_tis.tis_cap)
    torch.testing.assert_close(w[~broken], ratio)  # kept: each token's ratio, capped at tis_cap


def test_icepop_keeps_its_own_band():
    from megatron_s2d.config.schema import RolloutCorrectionConfig
    from megatron_s2d.stages.steps import correction

    c = correction(RolloutCorrectionConfig(mode="icepop"))
    assert (c.mode, c.low, c.high) == ("icepop", 0.5, 2.0)
    c = correction(RolloutCorrectionConfig(mode="icepop", low=0.9, high=1.1, icepop_low=0.25, icepop_high=4.0))
    assert (c.low, c.high) == (0.25, 4.0)
