"""Distillation and SFT losses vs loop references and exact full-vocabulary KL (torch.nn.functional.kl_div)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_s2d.errors import S2DError
from megatron_s2d.losses import forward_kl_sampled, forward_kl_topk, reverse_kl_topk, sft_loss

B, T, V = 2, 3, 7


def _logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale


def _ref_topk_kl(lp, lq, tail):
    """sum_k p (log p - log q) [+ tail bucket], in Python floats, one value per (b, t)."""
    out = torch.zeros(lp.shape[:2], dtype=torch.float64)
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            ps, qs = [math.exp(x) for x in lp[b, t].tolist()], [math.exp(x) for x in lq[b, t].tolist()]
            kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(ps, qs) if p > 0)
            if tail:
                pt, qt = 1 - sum(ps), 1 - sum(qs)
                kl += pt * (math.log(pt) - math.log(qt))
            out[b, t] = kl
    return out


def _exact_kl(logp, logq):  # (B, T, V) log-probs -> (B, T) KL(p || q)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def _one_token_losses(fn, s, t, **kw):
    """Per-token values through the public API: a one-hot mask with global_num_tokens = 1."""
    out = torch.zeros(s.shape[:2], dtype=torch.float64)
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            mask = torch.zeros(s.shape[:2], dtype=torch.bool)
            mask[b, i] = True
            out[b, i] = fn(s, t, mask, 1.0, **kw)[0]
    return out


@pytest.mark.parametrize("tail", [True, False])
def test_forward_topk_matches_reference(tail):
    lt, ls = _logits(0).log_softmax(-1), _logits(1).log_softmax(-1)
    t_top, ids = lt.topk(3, dim=-1)
    s_at = ls.gather(-1, ids)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, m = forward_kl_topk(s_at, t_top, mask, 4.0, tail=tail)
    ref = _ref_topk_kl(t_top, s_at, tail)
    torch.testing.assert_close(loss, ref[mask].sum() / 4.0)
    torch.testing.assert_close(m["kl_sum"], ref[mask].sum().float())
    torch.testing.assert_close(m["teacher_topk_mass_sum"], t_top.exp().sum(-1)[mask].sum().float())
    torch.testing.assert_close(m["student_topk_mass_sum"], s_at.exp().sum(-1)[mask].sum().float())
    assert m["token_count"] == 3


def test_reverse_topk_matches_reference():
    ls, lt = _logits(2).log_softmax(-1), _logits(3).log_softmax(-1)
    s_top, ids = ls.topk(4, dim=-1)
    t_at = lt.gather(-1, ids)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, _ = reverse_kl_topk(s_top, t_at, mask, float(B * T), tail=True)
    torch.testing.assert_close(loss, _ref_topk_kl(s_top, t_at, True).mean())


def test_reverse_topk_without_tail_is_refused():
    """Without the tail bucket the top-k reverse KL decreases by moving the student's mass out of its top-k."""
    ls, lt = _logits(2).log_softmax(-1), _logits(3).log_softmax(-1)
    s_top, ids = ls.topk(4, dim=-1)
    partial = lambda s: (s.exp() * (s - lt.gather(-1, ids))).sum()  # noqa: E731
    assert partial(s_top - 1.0) < partial(s_top)  # less mass on the top-k -> smaller "loss": the wrong direction
    with pytest.raises(S2DError, match="tail=False"):
        reverse_kl_topk(s_top, lt.gather(-1, ids), torch.ones(B, T, dtype=torch.bool), 1.0, tail=False)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_vocab_topk_equals_exact_kl_and_gradient(direction):
    z_s = _logits(4).requires_grad_()
    lt = _logits(5).log_softmax(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    ls = z_s.log_softmax(-1)
    if direction == "forward":
        t_top, ids = lt.topk(V, dim=-1)  # K = V, sorted: a permutation of the vocabulary
        loss, m = forward_kl_topk(ls.gather(-1, ids), t_top, mask, float(B * T))
        exact = _exact_kl(lt, ls).mean()
    else:
        s_top, ids = ls.topk(V, dim=-1)
        loss, m = reverse_kl_topk(s_top, lt.gather(-1, ids), mask, float(B * T))
        exact = _exact_kl(ls, lt).mean()
    (g_loss,) = torch.autograd.grad(loss, z_s, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact, z_s)
    torch.testing.assert_close(loss, exact)
    torch.testing.assert_close(g_loss, g_exact)
    torch.testing.assert_close(m["teacher_topk_mass_sum"], torch.tensor(float(B * T)))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_kl_lower_bounds_full_kl(direction):
    lt, ls = _logits(6, 3.0).log_softmax(-1), _logits(7, 3.0).log_softmax(-1)
    for k in (1, 2, 5):
        if direction == "forward":
            t_top, ids = lt.topk(k, dim=-1)
            approx = _one_token_losses(forward_kl_topk, ls.gather(-1, ids), t_top)
            exact = _exact_kl(lt, ls)
        else:
            s_top, ids = ls.topk(k, dim=-1)
            approx = _one_token_losses(reverse_kl_topk, s_top, lt.gather(-1, ids))
            exact = _exact_kl(ls, lt)
        assert torch.all(approx >= -1e-12) and torch.all(approx <= exact + 1e-12), (k, approx, exact)
        assert torch.any(approx < exact - 1e-3)  # strictly lossy for k < V on these inputs


def test_teacher_with_neg_inf_entries_and_fp32():
    # Teacher puts zero mass on 2 ids (its top-k then holds -inf); loss and gradient must stay finite and exact.
    lt = _logits(8).float()
    lt[..., :2] = float("-inf")
    lt = lt.log_softmax(-1)
    z_s = _logits(9).float().requires_grad_()
    ls = z_s.log_softmax(-1)
    t_top, ids = lt.topk(V, dim=-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, _ = forward_kl_topk(ls.gather(-1, ids), t_top, mask, float(B * T))
    p = lt.exp()
    exact = (torch.where(p > 0, p * (lt - ls), torch.zeros(())).sum(-1)).mean()
    (g,) = torch.autograd.grad(loss, z_s, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact, z_s)
    torch.testing.assert_close(loss, exact)
    torch.testing.assert_close(g, g_exact)


@pytest.mark.parametrize("fn", [forward_kl_topk, reverse_kl_topk])
def test_topk_micro_batching_and_masked_garbage(fn):
    s = _logits(10).log_softmax(-1)[..., :3].contiguous()
    t = _logits(11).log_softmax(-1)[..., :3].contiguous()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    x = s.clone().requires_grad_()
    loss_full, _ = fn(x, t, mask, 3.0)
    (g_full,) = torch.autograd.grad(loss_full, x)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask], t_bad[~mask] = float("nan"), float("-inf")
    y = s_bad.clone().requires_grad_()
    parts = [fn(y[i : i + 1], t_bad[i : i + 1], mask[i : i + 1], 3.0)[0] for i in range(B)]
    (g_parts,) = torch.autograd.grad(sum(parts), y)
    torch.testing.assert_close(sum(parts), loss_full)
    torch.testing.assert_close(g_parts, g_full)
    assert torch.all(g_parts[~mask] == 0)


def test_topk_errors():
    x = torch.zeros(B, T, 3)
    with pytest.raises(S2DError, match="student_logprobs_at_ids"):
        forward_kl_topk(torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T), 1.0)
    with pytest.raises(S2DError, match="teacher_topk_logprobs"):
        forward_kl_topk(x, torch.zeros(B, T, 4), torch.ones(B, T), 1.0)
    with pytest.raises(S2DError, match="mask"):
        reverse_kl_topk(x, x, torch.ones(B, T + 1), 1.0)
    with pytest.raises(S2DError, match="tail_floor"):
        reverse_kl_topk(x, x, torch.ones(B, T), 1.0, tail_floor=0.0)
    with pytest.raises(S2DError, match="global_num_tokens"):
        reverse_kl_topk(x, x, torch.ones(B, T), 0.0)


def test_sft_and_sampled_forward_kl():
    g = torch.Generator().manual_seed(12)
    lp = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    lt = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ref = sum(-lp[b, t] for b in range(3) for t in range(4) if mask[b, t]) / 10.0
    x = lp.clone().requires_grad_()
    loss, m = sft_loss(x, mask, 10.0)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, -mask.double() / 10.0)
    assert m["token_count"] == 8 and m["seq_count"] == 3
    loss2, m2 = forward_kl_sampled(lp, mask, 10.0, teacher_logprobs=lt)
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(m2["kl_sum"], (lt - lp)[mask].sum().float())
    assert m2["nll_sum"] == m["nll_sum"]
    seq, _ = sft_loss(lp, mask, 10.0, loss_agg="seq_mean_token_mean", global_num_seqs=3.0)
    ref_seq = sum(-lp[b][mask[b]].mean() for b in range(3)) / 3.0
    torch.testing.assert_close(seq, ref_seq)


@pytest.mark.parametrize("fn", [forward_kl_topk, reverse_kl_topk])
def test_topk_fp32_matches_fp64_for_peaked_students(fn):
    # Student almost all mass on its top ids (tail ~1e-9, below the fp32 resolution): fp32 loss and logit
    # gradient must still agree with fp64, i.e. the floored tail does not blow up.
    g = torch.Generator().manual_seed(13)
    zt = torch.randn(2, 8, 512, generator=g, dtype=torch.float64) * 3
    zs = torch.randn(2, 8, 512, generator=g, dtype=torch.float64) * 3
    zs[..., :4] += 30
    mask = torch.ones(2, 8, dtype=torch.bool)
    out = []
    for dt in (torch.float64, torch.float32):
        z = zs.to(dt).requires_grad_()
        lt, ls = zt.to(dt).log_softmax(-1), z.log_softmax(-1)
        if fn is forward_kl_topk:
            top, ids = lt.topk(8, dim=-1)
            loss, _ = fn(ls.gather(-1, ids), top, mask, 16.0)
        else:
            top, ids = ls.topk(8, dim=-1)
            loss, _ = fn(top, lt.gather(-1, ids), mask, 16.0)
        out.append((loss.double(), torch.autograd.grad(loss, z)[0].double()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-6)
