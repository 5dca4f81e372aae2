"""MegatronSampler under TP=2 (two gloo processes) generates exactly what TP=1 generates from the same weights.

Both layouts are built from one seed with megatron's CPU initialisation (``use_cpu_initialization``: the full
master weight is drawn and then split), which gives identical full weights under any TP layout; the test checks
that first (TP=2 vocab-parallel logits == the matching columns of the TP=1 logits). Then, for greedy and for
top-k/top-p sampling with a fixed seed: same tokens and finish reasons on both TP ranks and as under TP=1, and
log-probs / top-k log-probs equal to 1e-5. Both layouts run inside one spawned job (TP=1 first, as DP=2).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = pytest.mark.distributed

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True,
            max_position_embeddings=64)
PROMPT_LENS = (4, 9, 6, 2)


def _flat(result):
    return [(s.response_ids, s.finish_reason, s.logprobs, s.topk_ids, s.topk_logprobs)
            for group in result.samples for s in group]


def _prompts_and_runs(arch, g, seed):
    """The prompts (drawn from ``g``) and the two generations both layout checks run: greedy, and seeded sampling."""
    from megatron_s2d.rollout import SamplingParams

    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    runs = [SamplingParams(n=2, temperature=0.0, max_new_tokens=8, stop_token_ids=(5, 6, 7)),
            SamplingParams(n=3, temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=8, logprob_topk=3,
                           stop_token_ids=tuple(range(16)), seed=seed)]
    return prompts, runs


def _generate_tp1_then_tp2(rank: int, world_size: int, seed: int) -> dict:
    from megatron_s2d.models import ModelOptions, arch_from_hf_config, build_gpt_model
    from megatron_s2d.rollout import MegatronSampler
    from megatron_s2d.runtime.dist import init_distributed

    arch = arch_from_hf_config(TINY)
    prompts, runs = _prompts_and_runs(arch, torch.Generator().manual_seed(3), seed)
    probe = torch.tensor([prompts[1]])
    out = {}
    for tp in (1, 2):
        init_distributed(tp, 1)
        torch.manual_seed(seed)
        model = build_gpt_model(arch, ModelOptions(use_te="no"))
        model.eval()
        with torch.no_grad():
            out[f"probe{tp}"] = model(probe, None, None)  # (1, T, V / tp) vocab-parallel logits
        sampler = MegatronSampler(model, arch, max_batch_tokens=70)  # several chunks
        out[f"tp{tp}"] = [_flat(sampler.generate(prompts, p)) for p in runs]
    return out


def test_tp2_generation_equals_tp1():
    res = run_distributed(_generate_tp1_then_tp2, world_size=2, timeout=120, seed=17)
    v_local = TINY["vocab_size"] // 2
    for rank, r in enumerate(res):  # identical full weights under both layouts
        torch.testing.assert_close(r["probe2"], r["probe1"][..., rank * v_local: (rank + 1) * v_local],
                                   atol=1e-5, rtol=0)
    assert res[0]["tp2"] == res[1]["tp2"], "the two TP ranks must return identical samples"
    for mode, (tp1, tp2) in enumerate(zip(res[0]["tp1"], res[0]["tp2"])):
        assert [s[:2] for s in tp2] == [s[:2] for s in tp1], f"run {mode}: tokens/finish differ between TP=2 and TP=1"
        for a, b in zip(tp1, tp2):
            torch.testing.assert_close(torch.tensor(b[2]), torch.tensor(a[2]), atol=1e-5, rtol=0)
            if mode == 1:
                assert b[3] == a[3]
                torch.testing.assert_close(torch.tensor(b[4]), torch.tensor(a[4]), atol=1e-5, rtol=0)
    sampled = res[0]["tp2"][1]
    assert {s[1] for s in sampled} == {"stop", "length"} and len({tuple(s[0]) for s in sampled}) > 3


def _generate_pp1_then_pp2(rank: int, world_size: int, seed: int) -> dict:
    """Same HF-named weights loaded at PP=1 (as DP=2) and at PP=2 (tied embeddings: the last stage keeps a copy)."""
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.models import ModelOptions, arch_from_hf_config, build_gpt_model
    from megatron_s2d.rollout import MegatronSampler
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state

    arch = arch_from_hf_config(TINY)
    g = torch.Generator().manual_seed(4)
    weights = {k: torch.randn(*s, generator=g) * 0.2 for k, s in sorted(hf_shapes(arch).items())}
    weights = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in weights.items()}
    prompts, runs = _prompts_and_runs(arch, g, seed)
    out = {}
    for pp in (1, 2):
        init_distributed(1, pp)
        model = build_gpt_model(arch, ModelOptions(use_te="no"))
        load_hf_state(model, arch, lambda k: weights[k])
        sampler = MegatronSampler(model, arch, max_batch_tokens=70)  # several chunks, and compaction
        out[f"pp{pp}"] = [_flat(sampler.generate(prompts, p)) for p in runs]
    return out


def test_pp2_generation_equals_pp1():
    res = run_distributed(_generate_pp1_then_pp2, world_size=2, timeout=120, seed=23)
    assert res[0]["pp2"] == res[1]["pp2"], "both pipeline stages must return identical samples"
    for mode, (pp1, pp2) in enumerate(zip(res[0]["pp1"], res[0]["pp2"])):
        assert [s[:2] for s in pp2] == [s[:2] for s in pp1], f"run {mode}: tokens/finish differ between PP=2 and PP=1"
        for a, b in zip(pp1, pp2):
            torch.testing.assert_close(torch.tensor(b[2]), torch.tensor(a[2]), atol=1e-5, rtol=0)
            if mode == 1:
                assert b[3] == a[3]
                torch.testing.assert_close(torch.tensor(b[4]), torch.tensor(a[4]), atol=1e-5, rtol=0)
    sampled = res[0]["pp2"][1]
    assert len({tuple(s[0]) for s in sampled}) > 3
