"""Packed (THD) micro-batches with the Transformer Engine spec on one GPU (skipped without CUDA + TE).

The same GRPO batch through ``TrainablePolicy`` padded and packed (``pack_sequences`` False / True, TE layer spec):
log-probs, top-k ids and the train step's loss and grad norm agree. In fp32 (TE's unfused attention: tight
tolerances) and in bf16, the dtype of real runs, where THD runs cuDNN FusedAttention or flash attention, which fp32
never reaches (TE ``attention/dot_product_attention/utils.py``: those backends need fp16/bf16), with and without
Qwen3's qk-norm (review finding F15).
On CPU the same equivalence is covered for the block-mask path (tests/distributed/test_train_step_parallel.py).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
           tie_word_embeddings=False, max_position_embeddings=256)


QWEN3 = dict(CFG, model_type="qwen3")
# (dtype, config, tolerances): bf16 compares two kernels' rounding, so its bounds are bf16's (a few 1e-2 in log-prob)
CASES = {"fp32-llama": ("fp32", CFG, dict(lp=2e-4, topk=0.99, rel=1e-3)),
         "bf16-llama": ("bf16", CFG, dict(lp=3e-2, topk=0.95, rel=3e-2)),
         "bf16-qwen3-qknorm": ("bf16", QWEN3, dict(lp=3e-2, topk=0.95, rel=3e-2))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_thd_packed_equals_padded_with_te(case):
    dtype, cfg, tol = CASES[case]
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine (the `gpu` extra)")
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state

    init_distributed(1, 1)
    arch = arch_from_hf_config(cfg)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.05 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    n, t = 8, 96
    tokens = torch.randint(0, 256, (n, t), generator=g)
    lengths = torch.randint(20, t + 1, (n,), generator=g)
    mask = torch.zeros(n, t)
    for i in range(n):
        tokens[i, lengths[i]:] = 0
        mask[i, 8:lengths[i]] = 1
    batch = dict(tokens=tokens, lengths=lengths, loss_mask=mask)
    out = {}
    for pack in (False, True):
        pol = TrainablePolicy(MegatronModel(arch, ModelConfig(use_te="yes", pack_sequences=pack, dtype=dtype)),
                              OptimConfig(lr=1e-3, adam_eps=1e-2, grad_clip=0.0))
        assert pol.uses_te and pol.pack_sequences == pack
        load_hf_state(pol.module, arch, lambda k: init[k].cuda())
        pol.weights_changed()  # bf16: the optimizer's fp32 main params copy the loaded weights
        vals = pol.forward_values(batch, O.logprob_values(None, 1.0, topk=3), 200)
        b = dict(batch, old_logprobs=vals["logprobs"], advantages=torch.linspace(-1, 1, n))
        norm = O.Normalisers(float(mask.sum()), float(n))
        res = pol.train_step(b, O.policy_gradient(None, norm, eps_low=0.2, eps_high=0.28, temperature=1.0), 200)
        out[pack] = (vals, res)
    (v0, r0), (v1, r1) = out[False], out[True]
    torch.testing.assert_close(v1["logprobs"].float(), v0["logprobs"].float(), rtol=1e-4, atol=tol["lp"])
    assert (v1["topk_ids"] == v0["topk_ids"]).float().mean() > tol["topk"]
    assert r1.padded_tokens == int(lengths.sum()) < r0.padded_tokens
    for key in ("pg_loss_sum", "grad_norm", "entropy_sum"):
        assert r1.metrics[key] == pytest.approx(r0.metrics[key], rel=tol["rel"], abs=1e-4), key
