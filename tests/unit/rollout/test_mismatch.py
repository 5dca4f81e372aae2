"""logprob_mismatch against a slow per-token reference; refit chunking and byte counting (no vLLM needed)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.rollout.mismatch import logprob_mismatch
from megatron_s2d.rollout.refit import stream_refit
from megatron_s2d.rollout.vllm_engine import refit_chunks, request_seed


def _reference(engine, trainer, mask) -> dict[str, float]:
    diffs = [float(t) - float(e) for e, t, m in zip(engine.flatten(), trainer.flatten(), mask.flatten()) if m]
    n = len(diffs)
    return {
        "mean_abs_diff": sum(abs(d) for d in diffs) / n,
        "max_abs_diff": max(abs(d) for d in diffs),
        "mean_diff": sum(diffs) / n,
        "ratio_mean_minus_1": sum(math.exp(d) for d in diffs) / n - 1.0,
        "k3_kl": sum(math.exp(d) - 1.0 - d for d in diffs) / n,
        "n_tokens": float(n),
    }


def test_matches_reference_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(0)
    engine = -torch.rand(3, 7, generator=g) * 4  # (B, T)
    trainer = engine + 0.1 * torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    got = logprob_mismatch(engine, trainer, mask)
    want = _reference(engine.double(), trainer.double(), mask)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    # garbage (even NaN) under the mask changes nothing; a float mask works like a bool one
    junk = engine.clone()
    junk[~mask] = float("nan")
    assert logprob_mismatch(junk, trainer, mask.float()) == got


def test_identical_logprobs_give_zero_and_k3_is_positive():
    lp = torch.log_softmax(torch.randn(2, 5), -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    same = logprob_mismatch(lp, lp, mask)
    assert all(same[k] == 0.0 for k in ("mean_abs_diff", "max_abs_diff", "mean_diff", "ratio_mean_minus_1", "k3_kl"))
    shifted = logprob_mismatch(lp, lp + 0.2, mask)
    assert shifted["k3_kl"] == pytest.approx(math.exp(0.2) - 1.2) and shifted["k3_kl"] > 0
    assert shifted["max_abs_diff"] == pytest.approx(0.2, abs=1e-6)


def test_k3_estimates_kl_between_distributions():
    # tokens sampled from the engine distribution p; trainer distribution q: mean k3 -> KL(p || q)
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.log(p) + 0.3 * torch.randn(6, generator=g), 0)
    tok = torch.multinomial(p, 200_000, replacement=True, generator=g)[None]  # (1, N)
    stats = logprob_mismatch(p.log()[tok], q.log()[tok], torch.ones_like(tok, dtype=torch.bool))
    kl = float((p * (p.log() - q.log())).sum())
    assert stats["k3_kl"] == pytest.approx(kl, rel=0.05)
    assert abs(stats["ratio_mean_minus_1"]) < 0.01  # E_p[q/p] = 1


def test_bad_inputs_are_named():
    a = torch.zeros(2, 3)
    with pytest.raises(S2DError, match="shapes differ"):
        logprob_mismatch(a, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(S2DError, match="no tokens"):
        logprob_mismatch(a, a, torch.zeros(2, 3))
    bad = a.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(S2DError, match="trainer_logprobs has non-finite"):
        logprob_mismatch(a, bad, torch.ones(2, 3))


def _hf_like_stream():
    yield "model.embed_tokens.weight", torch.zeros(10, 4)
    for i in range(3):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
            yield f"model.layers.{i}.{part}.weight", torch.zeros(4, 4)
    yield "model.norm.weight", torch.zeros(4)
    yield "lm_head.weight", torch.zeros(10, 4)


def test_refit_chunks_keep_layers_together():
    for chunk_bytes in (1, 100, 300, 10**9):
        chunks = list(refit_chunks(_hf_like_stream(), chunk_bytes))
        names = [n for c in chunks for n, _ in c]
        assert names == [n for n, _ in _hf_like_stream()]  # order kept, nothing lost
        seen_layers: set[str] = set()
        for c in chunks:
            layers = {n.split(".")[2] for n, _ in c if ".layers." in n}
            assert not layers & seen_layers, "a decoder layer was split across chunks"
            seen_layers |= layers
        if chunk_bytes == 1:  # smallest possible chunks: embedding, one per layer, norm, lm_head
            assert len(chunks) == 6
        if chunk_bytes == 10**9:
            assert len(chunks) == 1


class _RecordingEngine:
    def __init__(self, stop_after: int | None = None):
        self.names: list[str] = []
        self.stop_after = stop_after

    def update_weights(self, named_tensors):
        for name, _ in named_tensors:
            self.names.append(name)
            if self.stop_after is not None and len(self.names) == self.stop_after:
                raise RuntimeError("engine failed")


def test_stream_refit_counts_bytes_and_drains_on_failure():
    total = sum(t.numel() * 4 for _, t in _hf_like_stream())
    eng = _RecordingEngine()
    stats = stream_refit(eng, _hf_like_stream())
    assert stats.bytes == total and stats.tensors == 15 and len(eng.names) == 15
    assert stats.seconds >= 0 and stats.seconds_per_gb >= 0
    assert stream_refit(None, _hf_like_stream()).bytes == total  # a rank without an engine drains the export
    drained = []

    def tracked():
        for item in _hf_like_stream():
            drained.append(item[0])
            yield item

    with pytest.raises(RuntimeError, match="engine failed"):
        stream_refit(_RecordingEngine(stop_after=3), tracked())
    assert len(drained) == 15  # the collective export still ran to the end


def test_request_seeds_are_distinct_and_stable():
    seeds = [request_seed(7, p) for p in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**56 for s in seeds)
    assert request_seed(7, 3) == seeds[3] and request_seed(8, 3) != seeds[3]
