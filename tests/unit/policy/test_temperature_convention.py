"""One temperature convention for every distillation objective: a student identical to its teacher gets zero
advantage and zero gradient in every mode, at T = 0.7 and T = 1 (see ``policy.objectives``: both models are compared
as softmax(z / T)). The stages build their teacher scoring and student objectives from the same ``temperature``; this
checks the objectives and the scoring they are given. Before the fix sampled OPD compared the student at T with the
teacher at 1 (nonzero advantages for an identical student when T != 1: the last test shows the size)."""

import pytest
import torch

from megatron_s2d.losses import opd_token_advantages
from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.logprobs import topk_logprobs

B, T_LEN, V, K = 2, 7, 24, 4


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, T_LEN), generator=g)
    mask = torch.zeros(B, T_LEN)
    mask[:, 2:] = 1
    return {"tokens": tokens, "lengths": torch.full((B,), T_LEN), "loss_mask": mask}


def _logits():
    return torch.randn(B, T_LEN, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2


def _norm(mb):
    return O.Normalisers(float(mb["loss_mask"].sum()), float(B))


def _grad(objective, logits, mb):
    z = logits.clone().requires_grad_(True)
    loss, _ = objective(z, mb)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_opd_identical_student_has_zero_advantage_and_gradient(temperature):
    mb, z = _batch(), _logits()
    teacher_lp = O.logprob_values(None, temperature)(z, mb)[1]["logprobs"]  # the teacher's scoring at T
    student_lp = O.logprob_values(None, temperature)(z, mb)[1]["logprobs"]  # PPO's old log-probs at T
    adv = opd_token_advantages(teacher_lp, student_lp, mb["loss_mask"])
    assert torch.equal(adv, torch.zeros_like(adv))
    mb.update(old_logprobs=student_lp, advantages=adv)
    _, grad = _grad(O.policy_gradient(None, _norm(mb), eps_low=0.2, eps_high=0.28, temperature=temperature), z, mb)
    assert grad.abs().max() == 0


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_topk_opd_identical_student_has_zero_loss_and_gradient(temperature):
    mb, z = _batch(), _logits()
    _, ids = topk_logprobs(z, K, temperature=temperature)  # the student's top-k at each logit position
    mb["topk_ids"] = O.shifted(ids[:, :-1])  # stored at the predicted position, as samples_to_batch does
    t_out = O.logprob_values(None, temperature, ids_key="topk_ids", tail=True)(z, mb)[1]
    mb.update(teacher_logprobs_at_ids=t_out["logprobs_at_ids"], teacher_log_tail=t_out["log_tail_at_ids"])
    loss, grad = _grad(O.reverse_kl_topk(None, _norm(mb), temperature=temperature), z, mb)
    assert abs(loss.item()) < 1e-12 and grad.abs().max() < 1e-12


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_topk_forward_kl_identical_student_has_zero_loss_and_gradient(temperature):
    mb, z = _batch(), _logits()
    vals, ids = topk_logprobs(z, K, temperature=temperature)  # what the teacher's engine caches, at T
    mb.update(topk_ids=O.shifted(ids[:, :-1]), topk_logprobs=O.shifted(vals[:, :-1]))
    loss, grad = _grad(O.forward_kl(None, _norm(mb), mode="topk", temperature=temperature), z, mb)
    assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_forward_kl_identical_student_has_zero_expected_gradient(temperature):
    """The NLL of teacher samples is zero-gradient only in expectation over the teacher's tokens: enumerate them."""
    z = _logits()[:1, :3]  # one row, predict position 2 from logits at position 1
    p_teacher = torch.softmax(z[0, 1] / temperature, -1)
    total = torch.zeros_like(z)
    for v in range(V):
        mb = {"tokens": torch.tensor([[0, 0, v]]), "lengths": torch.tensor([3]),
              "loss_mask": torch.tensor([[0.0, 0.0, 1.0]])}
        _, grad = _grad(O.forward_kl(None, O.Normalisers(1.0, 1.0), mode="sampled", temperature=temperature), z, mb)
        total += p_teacher[v] * grad
    assert total.abs().max() < 1e-12


def test_mixed_temperatures_would_not_be_a_fixed_point():
    """What the old sampled OPD did at T = 0.7: teacher at 1, student at T. An identical student gets advantages."""
    mb, z = _batch(), _logits()
    teacher_at_1 = O.logprob_values(None, 1.0)(z, mb)[1]["logprobs"]
    student_at_t = O.logprob_values(None, 0.7)(z, mb)[1]["logprobs"]
    adv = opd_token_advantages(teacher_at_1, student_at_t, mb["loss_mask"])
    assert adv.abs().max() > 0.1
