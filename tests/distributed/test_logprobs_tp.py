"""Vocab-parallel log-probs under TP=2 (two gloo processes) equal the TP=1 results, values and gradients.

Every rank builds the same full-vocab logits from one seed, keeps its vocab shard [rank * V/2, (rank + 1) * V/2),
and compares TP=2 outputs, and the gradient w.r.t. its shard, with TP=1 on the full logits and with a plain
`torch.log_softmax` autograd reference (the slice of its full-vocab gradient). All checks run inside
one spawned job to keep process start-up (torch import) to a single round.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_s2d.policy.logprobs import entropy, tail_logprob, token_logprobs, topk_logprobs
from tests.distributed._launch import DistributedError, run_distributed

pytestmark = pytest.mark.distributed

B, T, V = 2, 9, 32
TOL = dict(atol=1e-5, rtol=0)


def _grad_and_value(fn, x, weights):
    """(fn(x), d sum(weights * fn(x)) / dx) for a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def _ref_logprobs(x, targets, temperature):
    """Full-vocab reference through plain autograd: log_softmax(x / T) at targets (B, T) or (B, T, K)."""
    logp = torch.log_softmax(x / temperature, dim=-1)
    return logp.gather(-1, targets[..., None])[..., 0] if targets.dim() == 2 else logp.gather(-1, targets)


def _ref_entropy(x):
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _check_tp_matches_tp1(rank: int, world_size: int, seed: int) -> dict:
    group = dist.new_group(list(range(world_size)))  # a non-default group, as the TP group is in megatron-core
    v_local = V // world_size
    cols = slice(rank * v_local, (rank + 1) * v_local)
    g = torch.Generator().manual_seed(seed)  # same numbers on every rank
    full = torch.randn(B, T, V, generator=g) * 4
    full[0, 0, 3] = full[0, 0, 3 + v_local] = full[0, 0].max() + 1  # a tie across the two shards (top-k order)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids_k = torch.randint(0, V, (B, T, 3), generator=g)
    w, w_k = torch.randn(B, T, generator=g), torch.randn(B, T, 3, generator=g)
    shard = full[..., cols].contiguous()
    checks = []

    for targets, weights in ((ids, w), (ids_k, w_k)):
        for chunk_size in (None, 4):
            for temperature in (1.0, 0.7):
                kw = dict(chunk_size=chunk_size, temperature=temperature)
                want, want_grad = _grad_and_value(lambda x: token_logprobs(x, targets, **kw), full, weights)
                got, got_grad = _grad_and_value(lambda x: token_logprobs(x, targets, group, **kw), shard, weights)
                torch.testing.assert_close(got, want, **TOL)
                torch.testing.assert_close(got_grad, want_grad[..., cols], **TOL)
                ref, ref_grad = _grad_and_value(lambda x: _ref_logprobs(x, targets, temperature), full, weights)
                torch.testing.assert_close(got, ref, **TOL)
                torch.testing.assert_close(got_grad, ref_grad[..., cols], **TOL)
                checks.append(f"token_logprobs K={targets.dim() == 3} {kw}")

    for chunk_size in (None, 5):
        want, want_grad = _grad_and_value(lambda x: entropy(x, chunk_size=chunk_size), full, w)
        got, got_grad = _grad_and_value(lambda x: entropy(x, group, chunk_size=chunk_size), shard, w)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad[..., cols], **TOL)
        ref, ref_grad = _grad_and_value(_ref_entropy, full, w)
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(got_grad, ref_grad[..., cols], **TOL)
        checks.append(f"entropy chunk={chunk_size}")
        # the entropy fused into the log-prob pass (the train objectives' metric) under TP
        _, fused = token_logprobs(shard, ids, group, chunk_size=chunk_size, return_entropy=True)
        torch.testing.assert_close(fused, want, **TOL)
        checks.append(f"fused entropy chunk={chunk_size}")

    for k in (1, 4, v_local + 3):  # k > V_local: the merged candidates must come from both ranks
        want_v, want_i = topk_logprobs(full, k)
        got_v, got_i = topk_logprobs(shard, k, group, chunk_size=7)
        assert torch.equal(got_i, want_i), f"top-{k} ids differ under TP"
        torch.testing.assert_close(got_v, want_v, **TOL)
        ref_v, ref_i = torch.log_softmax(full.double(), -1).topk(k, dim=-1)
        torch.testing.assert_close(got_v.double(), ref_v, **TOL)
        assert torch.equal(got_i[:, 1:], ref_i[:, 1:]), f"top-{k} ids differ from torch.topk"  # [0, 0] has a tie
        checks.append(f"topk k={k}")
    assert topk_logprobs(shard, 2, group)[1][0, 0].tolist() == [3, 3 + v_local]  # tie: lower id first

    # the mass outside a top-k set (exact tail of the top-k KLs): ids on both shards, a near-collapsed tail
    tk = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(B * T)]).view(B, T, 5)
    peaked = full.clone().scatter_add_(-1, tk, torch.full((B, T, 5), 30.0))
    for chunk_size in (None, 4):
        kw = dict(chunk_size=chunk_size, temperature=0.7)
        want, want_grad = _grad_and_value(lambda x: tail_logprob(x, tk, **kw), peaked, w)
        got, got_grad = _grad_and_value(lambda x: tail_logprob(x, tk, group, **kw), peaked[..., cols].contiguous(), w)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad[..., cols], **TOL)
        checks.append(f"tail_logprob chunk={chunk_size}")

    # bf16 shards: fp32 maths on both sides, so TP=2 still matches TP=1 to fp32 rounding
    full16, shard16 = full.bfloat16(), shard.bfloat16()
    torch.testing.assert_close(token_logprobs(shard16, ids, group), token_logprobs(full16, ids), **TOL)
    checks.append("bf16")
    return {"rank": rank, "checks": checks}


def test_tp2_matches_tp1():
    results = run_distributed(_check_tp_matches_tp1, world_size=2, timeout=120, seed=1234)
    assert [r["rank"] for r in results] == [0, 1]
    assert len(results[0]["checks"]) == 8 + 2 + 2 + 3 + 2 + 1
    assert results[0]["checks"] == results[1]["checks"]


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def test_launcher_reports_remote_traceback():
    with pytest.raises(DistributedError) as info:
        run_distributed(_fail_on_rank_one, world_size=2, timeout=60)
    text = str(info.value)
    assert "rank 1: error" in text and "ValueError: deliberate failure on rank 1" in text
    assert "_fail_on_rank_one" in text and "rank 0" not in text  # the traceback names the failing function
