"""TP=1 checks of megatron_s2d.policy.logprobs against plain fp64 `torch.log_softmax` references."""

from __future__ import annotations

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.policy.logprobs import entropy, token_logprobs, topk_logprobs

B, T, V = 3, 7, 50


def _logits(dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ids(shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _ref_logprobs(logits, ids, temperature=1.0):
    """fp64 reference: log_softmax(z / T) gathered at ids (B, T) or (B, T, K)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    if ids.dim() == 2:
        return logp.gather(-1, ids[..., None])[..., 0]
    return logp.gather(-1, ids)


def _grad(fn, logits, weights):
    x = logits.detach().clone().requires_grad_(True)
    (fn(x) * weights).sum().backward()
    return x.grad


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_values_and_grad_match_reference(chunk_size, temperature):
    logits, ids = _logits(), _ids((B, T))
    w = torch.randn(B, T, dtype=torch.float64)
    out = token_logprobs(logits, ids, chunk_size=chunk_size, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    torch.testing.assert_close(out.double(), _ref_logprobs(logits, ids, temperature), atol=1e-5, rtol=0)

    got = _grad(lambda x: token_logprobs(x, ids, chunk_size=chunk_size, temperature=temperature), logits, w.float())
    want = _grad(lambda x: _ref_logprobs(x, ids, temperature), logits.double(), w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_k_ids_with_repeats_values_and_grad():
    logits = _logits()
    ids = _ids((B, T, 4))
    ids[..., 3] = ids[..., 0]  # a repeated id must get both gradient contributions
    w = torch.randn(B, T, 4, dtype=torch.float64)
    out = token_logprobs(logits, ids, chunk_size=5)
    assert out.shape == (B, T, 4)
    torch.testing.assert_close(out.double(), _ref_logprobs(logits, ids), atol=1e-5, rtol=0)
    got = _grad(lambda x: token_logprobs(x, ids, chunk_size=5), logits, w.float())
    want = _grad(lambda x: _ref_logprobs(x, ids), logits.double(), w)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_chunked_equals_unchunked():
    logits, ids = _logits(seed=3), _ids((B, T, 2), seed=4)
    w = torch.randn(B, T, 2)
    full = token_logprobs(logits, ids)
    g_full = _grad(lambda x: token_logprobs(x, ids), logits, w)
    for cs in (1, 2, 5, 20):
        torch.testing.assert_close(token_logprobs(logits, ids, chunk_size=cs), full, atol=1e-6, rtol=0)
        torch.testing.assert_close(_grad(lambda x: token_logprobs(x, ids, chunk_size=cs), logits, w), g_full,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(entropy(logits, chunk_size=cs), entropy(logits), atol=1e-6, rtol=0)


def test_gradcheck_fp64():
    logits = _logits(torch.float64)[:, :3, :9].contiguous().requires_grad_(True)
    ids = torch.randint(0, 9, (B, 3, 2))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_size=2, temperature=0.8), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy(x, chunk_size=4, temperature=1.7), (logits,))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_entropy_values_and_grad_match_reference(chunk_size):
    logits = _logits(seed=5)
    w = torch.randn(B, T, dtype=torch.float64)

    def ref(x, temperature=1.0):
        logp = torch.log_softmax(x.double() / temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    out = entropy(logits, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    torch.testing.assert_close(out.double(), ref(logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy(logits, temperature=2.0).double(), ref(logits, 2.0), atol=1e-5, rtol=0)
    got = _grad(lambda x: entropy(x, chunk_size=chunk_size), logits, w.float())
    want = _grad(ref, logits.double(), w)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_entropy_with_masked_vocab_is_finite():
    logits = _logits(seed=6)
    logits[..., 40:] = float("-inf")  # e.g. padded vocab rows masked out
    x = logits.clone().requires_grad_(True)
    h = entropy(x)
    h.sum().backward()
    ref_logp = torch.log_softmax(logits[..., :40].double(), -1)
    torch.testing.assert_close(h.double(), -(ref_logp.exp() * ref_logp).sum(-1), atol=1e-5, rtol=0)
    assert torch.isfinite(x.grad).all() and (x.grad[..., 40:] == 0).all()
    lp = token_logprobs(logits, torch.full((B, T), 45))
    assert torch.isneginf(lp).all()


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_topk_matches_torch_topk(chunk_size):
    logits = _logits(seed=7)
    values, ids = topk_logprobs(logits, 5, chunk_size=chunk_size, temperature=0.9)
    ref_v, ref_i = torch.log_softmax(logits.double() / 0.9, -1).topk(5, dim=-1)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64 and values.shape == (B, T, 5)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(values.double(), ref_v, atol=1e-5, rtol=0)
    all_v, all_i = topk_logprobs(logits, V)
    assert torch.equal(all_i.sort(-1).values, torch.arange(V).expand(B, T, V))


def test_topk_ties_prefer_lower_id():
    logits = torch.zeros(1, 2, 10)
    logits[0, 0, [8, 2, 5]] = 1.0  # three-way tie at the top, k cuts through it
    logits[0, 1, :] = 1.0  # everything tied
    values, ids = topk_logprobs(logits, 2)
    assert ids.tolist() == [[[2, 5], [0, 1]]]
    assert values[0, 0, 0] == values[0, 0, 1]
    # -inf columns are ranked last, by id
    logits = torch.full((1, 1, 6), float("-inf"))
    logits[0, 0, 4] = 0.0
    values, ids = topk_logprobs(logits, 3)
    assert ids.tolist() == [[[4, 0, 1]]] and values[0, 0, 0] == 0 and torch.isneginf(values[0, 0, 1:]).all()


def test_bf16_input_gives_fp32_output_and_bf16_grad():
    logits = _logits(torch.bfloat16, seed=8)
    ids = _ids((B, T), seed=9)
    out = token_logprobs(logits, ids, chunk_size=4)
    assert out.dtype == torch.float32
    # the same bf16 numbers, upcast exactly: only fp32 rounding separates the two
    torch.testing.assert_close(out.double(), _ref_logprobs(logits.float(), ids), atol=1e-5, rtol=0)
    assert entropy(logits).dtype == torch.float32
    assert topk_logprobs(logits, 3)[0].dtype == torch.float32
    x = logits.clone().requires_grad_(True)
    token_logprobs(x, ids).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    want = _grad(lambda y: _ref_logprobs(y, ids), logits.double(), torch.ones(B, T, dtype=torch.float64))
    torch.testing.assert_close(x.grad.double(), want, atol=1e-2, rtol=1e-2)


def test_does_not_modify_input_and_supports_no_grad():
    logits = _logits()
    before = logits.clone()
    with torch.no_grad():
        token_logprobs(logits, _ids((B, T)), temperature=0.5)
        entropy(logits, temperature=0.5)
        topk_logprobs(logits, 3, temperature=0.5)
    assert torch.equal(logits, before)


def test_bad_inputs_raise_clear_errors():
    logits = _logits()
    with pytest.raises(S2DError, match="target_ids: id 50 is outside"):
        token_logprobs(logits, torch.full((B, T), V))
    with pytest.raises(S2DError, match="target_ids: id -1"):
        token_logprobs(logits, torch.full((B, T), -1))
    with pytest.raises(S2DError, match="target_ids: shape"):
        token_logprobs(logits, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(S2DError, match="target_ids: expected an integer"):
        token_logprobs(logits, torch.zeros(B, T))
    with pytest.raises(S2DError, match="chunk_size"):
        token_logprobs(logits, _ids((B, T)), chunk_size=0)
    with pytest.raises(S2DError, match="temperature"):
        entropy(logits, temperature=0.0)
    with pytest.raises(S2DError, match="k: expected"):
        topk_logprobs(logits, V + 1)
    with pytest.raises(S2DError, match="NaN"):
        topk_logprobs(torch.full((1, 1, 4), float("nan")), 2)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_entropy_equals_entropy_and_leaves_logprob_grads_unchanged(chunk_size, temperature):
    logits = _logits(seed=8)
    logits[0, :, 45:] = float("-inf")  # masked vocab rows must not turn the fused entropy into NaN
    ids = _ids((B, T, 2), seed=9) % 40
    w = torch.randn(B, T, 2, dtype=torch.float32)
    kw = dict(chunk_size=chunk_size, temperature=temperature)
    lp, ent = token_logprobs(logits, ids, return_entropy=True, **kw)
    assert ent.shape == (B, T) and ent.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(ent, entropy(logits, **kw), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, token_logprobs(logits, ids, **kw), atol=0, rtol=0)
    got = _grad(lambda x: token_logprobs(x, ids, return_entropy=True, **kw)[0], logits, w)
    want = _grad(lambda x: token_logprobs(x, ids, **kw), logits, w)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # fp64 stays fp64
    lp64, ent64 = token_logprobs(logits.double(), ids, return_entropy=True, **kw)
    assert ent64.dtype == torch.float64
    torch.testing.assert_close(ent64, entropy(logits.double(), **kw), atol=1e-10, rtol=0)
