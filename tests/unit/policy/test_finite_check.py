"""The train step's finite check reads each gradient buffer once (not one host sync per parameter) and still catches
a non-finite gradient the loss does not show."""

from __future__ import annotations

import pytest
import torch

CFG = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
           max_position_embeddings=64)


def test_non_finite_gradient_with_a_finite_loss_skips_the_update(monkeypatch):
    from megatron_s2d.checkpoint.model_ckpt import export_hf_state
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import NonFiniteError, TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    pol = TrainablePolicy(MegatronModel(arch, ModelConfig(dtype="fp32", use_te="no")), OptimConfig(lr=1e-3))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 128, (3, 20), generator=g)
    mask = torch.ones(3, 20)
    mask[:, :4] = 0
    batch = dict(tokens=tokens, lengths=torch.tensor([20, 20, 20]), loss_mask=mask, advantages=torch.ones(3))
    batch["old_logprobs"] = pol.forward_values(batch, O.logprob_values(None, 1.0), 256)["logprobs"]
    obj = O.policy_gradient(None, O.Normalisers(float(mask.sum()), 3.0), eps_low=0.2, eps_high=0.28,
                            temperature=1.0)
    pol.train_step(batch, obj, 256)  # finite: applied

    isfinite_calls = []
    original = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: isfinite_calls.append(t.numel()) or original(t))
    pol.train_step(batch, obj, 256)
    monkeypatch.undo()
    n_params = sum(1 for _ in pol.module.parameters())
    n_buffers = len(pol.model.buffers)
    assert len(isfinite_calls) < n_params and sum(isfinite_calls) >= sum(p.numel() for p in pol.module.parameters())
    assert n_buffers >= 1

    weight = pol.module.decoder.layers[1].mlp.linear_fc2.weight  # one gradient goes inf; the loss stays finite
    handle = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = {k: v.clone() for k, v in export_hf_state(pol.module, arch)}
    try:
        with pytest.raises(NonFiniteError, match="non-finite loss or gradients"):
            pol.train_step(batch, obj, 256)
    finally:
        handle.remove()
    after = dict(export_hf_state(pol.module, arch))
    assert all(torch.equal(before[k], after[k]) for k in before), "the update must be skipped"
