"""clipped_pg_loss and the k3 KL vs slow per-token Python references; clip, aggregation and micro-batch checks."""

import math

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses import LOSS_AGGS, clipped_pg_loss, sampled_kl


def _ref_loss(lp, old, adv, mask, el, eh, ref, beta, agg, n_tok, n_seq, c):
    """Obvious loop: explicit branches instead of min/max/clamp."""
    B, T = lp.shape
    total = lp.new_zeros(())
    for b in range(B):
        seq_sum, seq_n = lp.new_zeros(()), 0
        for t in range(T):
            if not mask[b, t]:
                continue
            a = float(adv[b] if adv.dim() == 1 else adv[b, t])
            rho = torch.exp(lp[b, t] - old[b, t])
            in_range = 1 - el <= rho.item() <= 1 + eh
            rho_c = rho if in_range else lp.new_tensor(min(max(rho.item(), 1 - el), 1 + eh))
            obj = rho * a if rho.item() * a <= rho_c.item() * a else rho_c * a
            tok = -obj
            if c is not None and a < 0 and tok.item() > -c * a:
                tok = lp.new_tensor(-c * a)
            if ref is not None:
                x = ref[b, t] - lp[b, t]
                tok = tok + beta * (torch.exp(x) - x - 1)
            seq_sum, seq_n = seq_sum + tok, seq_n + 1
        if agg == "token_mean":
            total = total + seq_sum / n_tok
        elif agg == "seq_mean_token_mean":
            total = total + (seq_sum / seq_n if seq_n else seq_sum) / n_seq
        else:
            total = total + seq_sum / n_seq
    return total


def _batch(B=4, T=6, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.28]
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return lp, old, adv, mask, ref


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("kl_beta,dual", [(0.0, None), (0.1, None), (0.05, 3.0)])
def test_matches_reference(agg, per_token_adv, kl_beta, dual):
    lp, old, adv, mask, ref = _batch(seed=int(per_token_adv) + 7, per_token_adv=per_token_adv)
    ref_arg = ref if kl_beta else None
    n_tok, n_seq = float(mask.sum()) + 3.0, 5.0  # as if other micro-batches existed
    x = lp.clone().requires_grad_()
    loss, m = clipped_pg_loss(
        x, old, adv, mask, global_num_tokens=n_tok, global_num_seqs=n_seq, loss_agg=agg,
        eps_low=0.2, eps_high=0.28, ref_logprobs=ref_arg, kl_beta=kl_beta, dual_clip_c=dual,
    )
    loss.backward()
    y = lp.clone().requires_grad_()
    ref_loss = _ref_loss(y, old, adv, mask, 0.2, 0.28, ref_arg, kl_beta, agg, n_tok, n_seq, dual)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(x.grad, y.grad)
    # metrics against direct counts
    A = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    rho = torch.exp(lp - old)
    assert m["token_count"] == mask.sum()
    assert m["clip_low_count"] == (mask & (A < 0) & (rho < 0.8)).sum()
    assert m["clip_high_count"] == (mask & (A > 0) & (rho > 1.28)).sum()
    assert m["clip_low_count"] > 0 or m["clip_high_count"] > 0  # the batch does exercise clipping
    torch.testing.assert_close(m["ratio_sum"], rho[mask].sum().float())
    torch.testing.assert_close(m["ratio_max"], rho[mask].max().float())
    if kl_beta:
        k3 = torch.exp(ref - lp) - (ref - lp) - 1
        torch.testing.assert_close(m["kl_sum"], k3[mask].sum().float())
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in m.values())


def _grad_of(lp, old, adv, **kw):
    x = lp.clone().requires_grad_()
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, m = clipped_pg_loss(x, old, adv, mask, global_num_tokens=float(lp.numel()), **kw)
    loss.backward()
    return x.grad, m


def test_clip_zero_gradient_only_on_the_clipped_side():
    # ratios: 1.5, 1.5, 0.5, 0.5, 1.0 ; advantages: +, -, -, +, +
    old = torch.zeros(1, 5, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    grad, m = _grad_of(lp, old, adv, eps_low=0.2, eps_high=0.2)
    assert grad[0, 0] == 0 and grad[0, 2] == 0  # rho > 1+eps with A>0, rho < 1-eps with A<0: clipped
    assert grad[0, 1] != 0 and grad[0, 3] != 0 and grad[0, 4] != 0  # pessimistic side keeps the gradient
    torch.testing.assert_close(grad[0, 1], torch.tensor(1.5 / 5, dtype=torch.float64))  # d(-rho A)/dlp = -A rho/N
    assert m["clip_high_count"] == 1 and m["clip_low_count"] == 1


def test_clip_higher_is_asymmetric():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.25, 0.75]], dtype=torch.float64))
    up = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    down = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    assert _grad_of(lp, old, up, eps_low=0.2, eps_high=0.28)[0][0, 0] != 0  # 1.25 < 1.28: not clipped
    assert _grad_of(lp, old, up, eps_low=0.2, eps_high=0.2)[0][0, 0] == 0  # symmetric: clipped
    assert _grad_of(lp, old, down, eps_low=0.2, eps_high=0.28)[0][0, 1] == 0  # 0.75 < 0.8: clipped
    assert _grad_of(lp, old, down, eps_low=0.3, eps_high=0.28)[0][0, 1] != 0


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.log(torch.tensor([[5.0, 2.0]], dtype=torch.float64))
    adv = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    grad, m = _grad_of(lp, old, adv, dual_clip_c=3.0)
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and m["dual_clip_count"] == 1
    with pytest.raises(S2DError, match="dual_clip_c"):
        _grad_of(lp, old, adv, dual_clip_c=1.0)


def test_on_policy_gradient_is_reinforce():
    lp, _, adv, mask, _ = _batch(seed=3)
    x = lp.clone().requires_grad_()
    n = float(mask.sum())
    loss, _ = clipped_pg_loss(x, lp, adv, mask, global_num_tokens=n)
    loss.backward()
    torch.testing.assert_close(x.grad, -adv[:, None] * mask / n)
    torch.testing.assert_close(loss, -(adv[:, None] * mask).sum() / n)


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_micro_batching_invariance(agg):
    lp, old, adv, mask, ref = _batch(B=6, T=5, seed=11, per_token_adv=True)
    kw = dict(global_num_tokens=float(mask.sum()), global_num_seqs=6.0, loss_agg=agg, ref_logprobs=ref, kl_beta=0.1)
    full = lp.clone().requires_grad_()
    loss_full, _ = clipped_pg_loss(full, old, adv, mask, **kw)
    loss_full.backward()
    parts = lp.clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        loss, _ = clipped_pg_loss(parts[sl], old[sl], adv[sl], mask[sl], **{**kw, "ref_logprobs": ref[sl]})
        total = total + loss
    total.backward()
    torch.testing.assert_close(total, loss_full)
    torch.testing.assert_close(parts.grad, full.grad)


def test_seq_mean_vs_token_mean():
    lp, old, adv, mask, _ = _batch(B=4, T=6, seed=5)
    B, T = lp.shape
    kw = dict(global_num_tokens=float(mask.sum()), global_num_seqs=float(B))
    tok, _ = clipped_pg_loss(lp, old, adv, mask, loss_agg="token_mean", **kw)
    seq, _ = clipped_pg_loss(lp, old, adv, mask, loss_agg="seq_mean_token_mean", **kw)
    assert len(set(mask.sum(-1).tolist())) > 1 and not torch.isclose(tok, seq)
    full = torch.ones(B, T, dtype=torch.bool)  # equal lengths: the two means coincide
    kw = dict(global_num_tokens=float(B * T), global_num_seqs=float(B))
    tok, _ = clipped_pg_loss(lp, old, adv, full, loss_agg="token_mean", **kw)
    seq, _ = clipped_pg_loss(lp, old, adv, full, loss_agg="seq_mean_token_mean", **kw)
    ssum, _ = clipped_pg_loss(lp, old, adv, full, loss_agg="seq_mean_token_sum", **kw)
    torch.testing.assert_close(tok, seq)
    torch.testing.assert_close(ssum, seq * T)


def test_masked_garbage_is_ignored():
    lp, old, adv, mask, ref = _batch(seed=2, per_token_adv=True)
    assert not mask.all()
    bad = ~mask
    lp_b, old_b, adv_b, ref_b = (t.clone() for t in (lp, old, adv, ref))
    lp_b[bad], old_b[bad], adv_b[bad], ref_b[bad] = float("nan"), float("inf"), float("-inf"), float("nan")
    x = lp.clone().requires_grad_()
    y = lp_b.clone().requires_grad_()
    l1, _ = clipped_pg_loss(x, old, adv, mask, global_num_tokens=10.0, ref_logprobs=ref, kl_beta=0.2)
    l2, m2 = clipped_pg_loss(y, old_b, adv_b, mask, global_num_tokens=10.0, ref_logprobs=ref_b, kl_beta=0.2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(y.grad, x.grad)
    assert torch.all(y.grad[bad] == 0)
    assert all(torch.isfinite(v) for v in m2.values())


def test_float_mask_and_empty_rows():
    lp, old, adv, mask, _ = _batch(seed=4)
    mask[1] = False
    l1, m1 = clipped_pg_loss(lp, old, adv, mask, global_num_tokens=7.0, global_num_seqs=4.0, loss_agg="seq_mean_token_mean")
    l2, _ = clipped_pg_loss(lp, old, adv, mask.double(), global_num_tokens=7.0, global_num_seqs=4.0, loss_agg="seq_mean_token_mean")
    assert torch.isfinite(l1) and torch.equal(l1, l2)
    assert m1["seq_count"] == 3


def test_errors():
    lp, old, adv, mask, ref = _batch()
    kw = dict(global_num_tokens=4.0)
    with pytest.raises(S2DError, match="loss_agg"):
        clipped_pg_loss(lp, old, adv, mask, loss_agg="mean", **kw)
    with pytest.raises(S2DError, match="old_logprobs"):
        clipped_pg_loss(lp, old[:, :-1], adv, mask, **kw)
    with pytest.raises(S2DError, match="advantages"):
        clipped_pg_loss(lp, old, adv[:-1], mask, **kw)
    with pytest.raises(S2DError, match="ref_logprobs"):
        clipped_pg_loss(lp, old, adv, mask, kl_beta=0.1, **kw)
    with pytest.raises(S2DError, match="global_num_seqs"):
        clipped_pg_loss(lp, old, adv, mask, loss_agg="seq_mean_token_sum", **kw)
    with pytest.raises(S2DError, match="global_num_tokens"):
        clipped_pg_loss(lp, old, adv, mask, global_num_tokens=0)
    with pytest.raises(S2DError, match="eps_low"):
        clipped_pg_loss(lp, old, adv, mask, eps_low=1.0, **kw)


def test_k3_nonnegative_zero_at_equality_and_unbiased():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    k3 = sampled_kl(a, b, "k3")
    assert torch.all(k3 >= 0)
    assert torch.all(sampled_kl(a, a, "k3") == 0)
    torch.testing.assert_close(k3, torch.exp(b - a) - (b - a) - 1)
    x = a.clone().requires_grad_()
    sampled_kl(x, x.detach(), "k3").sum().backward()  # minimum at logp == ref: zero gradient
    assert torch.all(x.grad == 0)
    # Monte Carlo: E_{y~p}[k1] = E_{y~p}[k3] = KL(p || q)
    logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    kl = (logp.exp() * (logp - logq)).sum()
    y = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        assert math.isclose(sampled_kl(logp[y], logq[y], est).mean(), kl, abs_tol=0.01)
    with pytest.raises(S2DError, match="estimator"):
        sampled_kl(a, b, "k4")


def test_k3_penalty_output_is_clamped():
    """One token with log(pi_ref / pi) = 20 contributed e^20 - 21 ~ 4.9e8 to the k3 penalty: clamped to kl_clamp."""
    logp = torch.tensor([[-25.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-5.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, m = clipped_pg_loss(logp, logp.detach(), torch.zeros(1), mask, global_num_tokens=2.0, ref_logprobs=ref,
                              kl_beta=1.0, kl_clamp=10.0)
    assert m["kl_sum"].item() == pytest.approx(10.0)
    loss.backward()
    assert logp.grad[0, 0] == 0  # a clamped token passes no gradient
    _, m = clipped_pg_loss(logp, logp.detach(), torch.zeros(1), mask, global_num_tokens=2.0, ref_logprobs=ref,
                           kl_beta=1.0, kl_clamp=None)
    assert m["kl_sum"].item() > 1e8
