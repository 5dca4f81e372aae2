"""Metric reduction conventions: micro-batch merging then finalisation equals the full-batch metrics."""

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.losses import clipped_pg_loss, finalize_metrics, merge_metrics, metric_reduce_op


def test_reduce_ops():
    assert metric_reduce_op("token_count") == "sum"
    assert metric_reduce_op("kl_sum") == "sum"
    assert metric_reduce_op("clip_low_count") == "sum"
    assert metric_reduce_op("ratio_max") == "max"
    assert metric_reduce_op("x_min") == "min"
    with pytest.raises(S2DError, match="ratio_mean"):
        metric_reduce_op("ratio_mean")


def test_merged_micro_batches_equal_full_batch():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, 5, generator=g)
    old = lp + 0.3 * torch.randn(6, 5, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    kw = dict(global_num_tokens=float(mask.sum()), ref_logprobs=lp + 0.1, kl_beta=0.1)
    _, full = clipped_pg_loss(lp, old, adv, mask, **kw)
    merged = {}
    for sl in (slice(0, 2), slice(2, 6)):
        _, m = clipped_pg_loss(lp[sl], old[sl], adv[sl], mask[sl], **{**kw, "ref_logprobs": lp[sl] + 0.1})
        merged = merge_metrics(merged, m)
    a, b = finalize_metrics(full), finalize_metrics(merged)
    assert a.keys() == b.keys() and {"ratio_mean", "clip_low_frac", "kl_mean", "ratio_max", "token_count"} <= a.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    rho = torch.exp(lp - old)[mask]
    assert a["ratio_mean"] == pytest.approx(rho.mean().item(), rel=1e-6)
    assert a["ratio_max"] == pytest.approx(rho.max().item(), rel=1e-6)


def test_finalize_requires_token_count():
    with pytest.raises(S2DError, match="token_count"):
        finalize_metrics({"kl_sum": torch.tensor(1.0)})
