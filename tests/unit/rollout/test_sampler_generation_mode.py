"""MegatronSampler on a model that trains with FP8 / sequence parallelism, its KV budget, and its host syncs (CPU).

- Generation runs without FP8 and without sequence parallelism whatever the model trains with: every prefill
  ((u, L) rows x prompt) and decode ((b_live, 1)) forward sees ``config.fp8`` None and sequence parallelism off (so
  no FP8 GEMM ever gets these unpadded shapes), ``is_first_microbatch`` is reset before the first forward (F4), and
  everything is restored afterwards. The model here is the local spec (no TE on CPU) with the flags set as
  models/build.py sets them with TE; tests/gpu/test_fp8_gpu.py runs the real thing.
- ``max_batch_tokens="auto"``: the KV bytes per token at the model's layout, the CPU budget.
- The decode loop's host syncs are O(steps / CHECK_EVERY), not several per step.
"""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.models import ModelOptions, arch_from_hf_config, build_gpt_model
from megatron_s2d.models.build import FP8_FORMAT
from megatron_s2d.rollout import MegatronSampler, SamplingParams
from megatron_s2d.rollout.megatron_sampler import CHECK_EVERY, CPU_MAX_BATCH_TOKENS, kv_bytes_per_token
from megatron_s2d.runtime.dist import init_distributed

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True,
            max_position_embeddings=64)
PROMPT_LENS = (3, 9, 5, 12, 5, 1)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_distributed(1, 1)
    arch = arch_from_hf_config(TINY)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    yield arch, prompts
    torch.set_num_threads(threads)


def _model(arch):
    torch.manual_seed(0)
    return build_gpt_model(arch, ModelOptions(use_te="no"))


def _samples(res):
    return [[(s.response_ids, s.logprobs, s.finish_reason) for s in g] for g in res.samples]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_generation_runs_without_fp8_and_sequence_parallel(tiny, recipe):
    arch, prompts = tiny
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=9, seed=3, stop_token_ids=(0, 1, 2, 3))
    want = _samples(MegatronSampler(_model(arch), arch).generate(prompts, params))

    model = _model(arch)
    cfg = model.config
    cfg.fp8, cfg.fp8_recipe, cfg.sequence_parallel = FP8_FORMAT[recipe], recipe, True  # as build.py sets with TE
    sp_modules = [model.output_layer, model.embedding.word_embeddings]
    for m in sp_modules:
        m.sequence_parallel = True  # what an SP model's linears / embedding hold (TP1 has them off)
    model.embedding.reduce_scatter_embeddings = True
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    fc1.is_first_microbatch = False  # as megatron's TE wrappers leave it after a training forward
    seen = []

    def record(module, args, kwargs):
        seen.append(dict(shape=tuple(args[0].shape), fp8=cfg.fp8, sp=cfg.sequence_parallel,
                         attrs=[m.sequence_parallel for m in sp_modules] + [model.embedding.reduce_scatter_embeddings],
                         first=fc1.is_first_microbatch))
        fc1.is_first_microbatch = False  # what a TE linear does after each forward

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = _samples(MegatronSampler(model, arch).generate(prompts, params))
    finally:
        hook.remove()
    assert got == want  # the same samples as the plain model (same weights)
    assert seen[0]["first"] is True, "is_first_microbatch must be reset before the first forward (F4)"
    # unpadded shapes: the prefill (unique prompts, shortest prompt), then decode steps (live rows, 1)
    assert seen[0]["shape"] == (len(prompts), min(PROMPT_LENS)) and len(seen) > 1
    assert all(s["shape"][1] == 1 and s["shape"][0] <= 2 * len(prompts) for s in seen[1:])
    assert all(s["fp8"] is None and s["sp"] is False and not any(s["attrs"]) for s in seen)
    # restored exactly afterwards, and the next FP8 forward recasts its weights
    assert (cfg.fp8, cfg.fp8_recipe, cfg.sequence_parallel) == (FP8_FORMAT[recipe], recipe, True)
    assert all(m.sequence_parallel for m in sp_modules) and model.embedding.reduce_scatter_embeddings
    assert fc1.is_first_microbatch is True


def test_kv_bytes_per_token_and_the_cpu_budget(tiny):
    arch, prompts = tiny
    # Qwen3-1.7B (28 layers, 8 KV heads, head_dim 128) in bf16: 112 KiB per token at TP1 PP1, 28 KiB at TP4
    assert kv_bytes_per_token(28, 8, 128, 2) == 114688 == 112 * 1024
    assert kv_bytes_per_token(28, 8 // 4, 128, 2) == 28 * 1024
    sampler = MegatronSampler(_model(arch), arch)  # the default: "auto"
    assert sampler.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4  # the tiny model: 2 layers, 2 KV heads, 32, fp32
    assert sampler.max_batch_tokens == "auto" and sampler.batch_token_budget() == CPU_MAX_BATCH_TOKENS
    res = sampler.generate(prompts[:2], SamplingParams(max_new_tokens=2))
    assert res.metrics["max_batch_tokens"] == CPU_MAX_BATCH_TOKENS
    assert MegatronSampler(_model(arch), arch, max_batch_tokens=70).batch_token_budget() == 70
    for bad in ("big", 0, 2.5, True):
        with pytest.raises(S2DError, match="max_batch_tokens: expected a positive int or 'auto'"):
            MegatronSampler(_model(arch), arch, max_batch_tokens=bad)


def test_decode_loop_host_syncs_are_not_per_step(tiny, monkeypatch):
    """Every tensor -> Python conversion and ``nonzero`` the project's code makes during a generate is counted (the
    model's own forward is megatron's): a decode step must not need any (before: ``nonzero``, the log-prob id check
    and ``int(active.sum())``, three per step)."""
    arch, prompts = tiny
    sampler = MegatronSampler(_model(arch), arch, eos_token_ids=[])
    max_new = 40
    counts = {"n": 0}
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            frame = sys._getframe(1)
            while frame.f_code.co_filename.endswith("cpu_shim.py"):  # the CPU shim's torch-function mode: skip it
                frame = frame.f_back
            if "megatron_s2d" in frame.f_code.co_filename:
                counts["n"] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    res = sampler.generate(prompts, SamplingParams(n=2, max_new_tokens=max_new, seed=1))
    monkeypatch.undo()
    steps = max(PROMPT_LENS) + max_new - min(PROMPT_LENS)  # decode steps of the one chunk
    assert all(len(s.response_ids) == max_new for g in res.samples for s in g)
    assert counts["n"] <= steps // CHECK_EVERY + 12, counts  # the periodic checks + the results' copies
