"""Counter-based uniforms and the truncated inverse-CDF sampler of megatron_s2d.rollout.token_sampling."""

from __future__ import annotations

import torch

from megatron_s2d.rollout.token_sampling import mix32, prompt_key, row_keys, sample_tokens, uniforms


def _lowbias32(x: int) -> int:
    """Plain-Python reference of the hash (Python ints do not overflow)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_matches_reference():
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [_lowbias32(x) for x in xs]


def test_uniforms_range_moments_and_independence():
    keys = row_keys(7, torch.full((4000,), prompt_key(0, [1, 2, 3])), torch.arange(4000))
    u = torch.cat([uniforms(keys, torch.full_like(keys, t)) for t in range(5)])  # (20000,)
    assert u.dtype == torch.float64 and bool((u >= 0).all() & (u < 1).all())
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.004
    a, b = u[:4000], u[4000:8000]  # consecutive steps of the same sequences are uncorrelated
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05
    # seed, prompt content and prompt index all change the stream
    base = row_keys(7, torch.tensor([prompt_key(0, [1, 2, 3])]), torch.tensor([0]))
    for other in (row_keys(8, torch.tensor([prompt_key(0, [1, 2, 3])]), torch.tensor([0])),
                  row_keys(7, torch.tensor([prompt_key(1, [1, 2, 3])]), torch.tensor([0])),
                  row_keys(7, torch.tensor([prompt_key(0, [1, 2, 4])]), torch.tensor([0])),
                  row_keys(7, torch.tensor([prompt_key(0, [1, 2, 3])]), torch.tensor([1]))):
        assert other.item() != base.item()


def _empirical(logits, n, **kw):
    keys = row_keys(3, torch.zeros(n, dtype=torch.long), torch.arange(n))
    u = uniforms(keys, torch.zeros(n, dtype=torch.long))
    tok = sample_tokens(logits.expand(n, -1), u, **kw)
    return torch.bincount(tok, minlength=logits.shape[-1]).double() / n


def _check_freq(freq, want, n):
    sigma = (want * (1 - want) / n).sqrt()
    assert bool(((freq - want).abs() <= 5 * sigma + 1e-12).all()), (freq, want)


def test_sampling_distribution_with_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    n = 20000
    # temperature only
    want = torch.softmax(logits[0].double() / 0.7, -1)
    _check_freq(_empirical(logits, n, temperature=0.7), want, n)
    # top-k = 3: tokens 5, 0, 1 renormalised
    keep = torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool)
    want = torch.softmax(logits[0].double().masked_fill(~keep, -float("inf")), -1)
    freq = _empirical(logits, n, top_k=3)
    assert freq[~keep].sum() == 0
    _check_freq(freq, want, n)
    # top-p = 0.8: sorted probs 0.61, 0.22, 0.08, ...: the 0.8 mass is reached after two tokens
    p = torch.softmax(logits[0].double(), -1)
    keep = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert p[keep].sum() >= 0.8 > p[5]
    freq = _empirical(logits, n, top_p=0.8)
    assert freq[~keep].sum() == 0
    _check_freq(freq, p.masked_fill(~keep, 0) / p[keep].sum(), n)


def test_greedy_and_edge_uniforms():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits, torch.zeros(2), temperature=0).tolist() == [1, 0]  # ties -> lowest id
    near_one = torch.full((2,), 1 - 2**-53, dtype=torch.float64)
    tok = sample_tokens(logits, near_one, top_k=2)  # never a truncated token, even at u -> 1
    assert tok.tolist()[0] in (1, 2) and tok.tolist()[1] in (0, 1, 2, 3)
    assert sample_tokens(logits, torch.zeros(2, dtype=torch.float64), top_p=0.5).tolist() == [1, 0]
