"""Top-k KL objectives take the student's tail mass from its logits (a log-sum-exp over the ids outside the top-k),
so a collapsed tail still gets its exact restoring gradient. Before: the tail was 1 - sum(exp(top-k)) floored at
1e-6, and a student tail below the floor got no gradient (fp64: +1e-8 against -0.955 exact)."""

import torch

from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.logprobs import tail_logprob

V, K, T_LEN = 40, 4, 6


def _mb(ids_key, ids):
    tokens = torch.zeros(1, T_LEN, dtype=torch.long)
    mask = torch.zeros(1, T_LEN)
    mask[0, 1:] = 1
    return {"tokens": tokens, "lengths": torch.tensor([T_LEN]), "loss_mask": mask, ids_key: ids}


def _brute_force_fkl(logits64, teacher_lp_k, ids, temperature):
    """(k+1)-bucket KL(p_T || p_S) per predicted position from full softmaxes, fp64."""
    ls = torch.log_softmax(logits64 / temperature, dim=-1)[0, :-1]  # (T-1, V): position t predicts t + 1
    s_k = ls.gather(-1, ids[0, 1:])  # (T-1, K)
    keep = torch.ones_like(ls, dtype=torch.bool).scatter_(-1, ids[0, 1:], False)
    s_tail = torch.logsumexp(ls.masked_fill(~keep, float("-inf")), dim=-1)
    t_k = teacher_lp_k[0, 1:].double()
    t_tail = torch.log(-torch.expm1(torch.logsumexp(t_k, -1)))
    kl = (t_k.exp() * (t_k - s_k)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl.sum() / (T_LEN - 1)


def test_collapsed_student_tail_gets_the_exact_gradient():
    torch.manual_seed(0)
    temperature = 0.7
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(T_LEN)])[None]  # (1, T, K) teacher's top-k per position
    logits = torch.randn(1, T_LEN, V, dtype=torch.float64) * 0.5
    # student: almost all mass on the teacher's top-k ids (tail ~1e-12, below the old floor of 1e-6)
    logits.scatter_add_(-1, torch.roll(ids, -1, dims=1), torch.full((1, T_LEN, K), 20.0, dtype=torch.float64))
    teacher_lp = torch.log_softmax(torch.randn(1, T_LEN, K) * 0.3, -1) + torch.log(torch.tensor(0.8))  # tail 0.2
    mb = _mb("topk_ids", ids)
    mb["topk_logprobs"] = teacher_lp

    z = logits.float().requires_grad_(True)
    loss, _ = O.forward_kl(None, O.Normalisers(T_LEN - 1, 1), mode="topk", temperature=temperature)(z, mb)
    loss.backward()
    z64 = logits.clone().requires_grad_(True)
    ref = _brute_force_fkl(z64, teacher_lp, ids, temperature)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))
    # the tail logits (not in the top-k) must be pulled up: their exact gradient is large and negative
    tail_cols = torch.ones(V, dtype=torch.bool)
    tail_cols[torch.roll(ids, -1, dims=1)[0, 0]] = False
    g_ref, g = z64.grad[0, 0, tail_cols].sum(), z.grad[0, 0, tail_cols].sum().double()
    assert g_ref < -0.01, g_ref  # with the old floored tail this was ~1e-12: no way back for a collapsed tail
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6)


def test_tail_logprob_matches_brute_force_and_survives_tiny_tails():
    torch.manual_seed(1)
    z = torch.randn(3, 5, V, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(15)]).view(3, 5, K)
    z.scatter_add_(-1, ids, torch.full((3, 5, K), 70.0, dtype=torch.float64))  # tails ~e^-70
    got = tail_logprob(z.float(), ids, temperature=1.3, chunk_size=4)
    lp = torch.log_softmax(z / 1.3, -1)
    keep = torch.ones_like(lp, dtype=torch.bool).scatter_(-1, ids, False)
    want = torch.logsumexp(lp.masked_fill(~keep, float("-inf")), -1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_reverse_topk_objective_uses_both_exact_tails():
    torch.manual_seed(2)
    temperature = 1.0
    student = torch.randn(1, T_LEN, V, dtype=torch.float64)
    teacher = torch.randn(1, T_LEN, V, dtype=torch.float64)
    ids = torch.log_softmax(student, -1).topk(K, dim=-1).indices  # the student's top-k at each logit position
    mb = _mb("topk_ids", torch.roll(ids, 1, dims=1))  # stored at the predicted position
    t_out = O.logprob_values(None, temperature, ids_key="topk_ids", tail=True)(teacher, mb)[1]
    mb["teacher_logprobs_at_ids"], mb["teacher_log_tail"] = t_out["logprobs_at_ids"], t_out["log_tail_at_ids"]
    z = student.clone().requires_grad_(True)
    loss, m = O.reverse_kl_topk(None, O.Normalisers(T_LEN - 1, 1), temperature=temperature)(z, mb)
    ls, lt = torch.log_softmax(student, -1)[0, :-1], torch.log_softmax(teacher, -1)[0, :-1]
    sel = ids[0, :-1]
    keep = torch.ones_like(ls, dtype=torch.bool).scatter_(-1, sel, False)
    s_tail = torch.logsumexp(ls.masked_fill(~keep, float("-inf")), -1)
    t_tail = torch.logsumexp(lt.masked_fill(~keep, float("-inf")), -1)
    s_k, t_k = ls.gather(-1, sel), lt.gather(-1, sel)
    ref = ((s_k.exp() * (s_k - t_k)).sum(-1) + s_tail.exp() * (s_tail - t_tail)).mean()
    torch.testing.assert_close(loss, ref)
