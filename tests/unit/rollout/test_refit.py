"""Refit chunking and byte counting, request seeds (no vLLM needed). The engine-vs-trainer mismatch statistics are
tested in tests/unit/stages/test_mismatch.py."""

from __future__ import annotations

import pytest
import torch

from megatron_s2d.rollout.refit import stream_refit
from megatron_s2d.rollout.vllm_engine import refit_chunks, request_seed


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
