"""Padding to the FP8 token multiple changes nothing: the masked positions move no loss, log-prob or gradient.

FP8 itself needs a GPU (tests/gpu/test_fp8_gpu.py); what it changes on the trainer's side is the shapes. Here an fp32
model without FP8 runs the same shapes an FP8 model gets (``MegatronModel.token_multiple`` set to 16 and 128, the
multiples of the delayed/tensorwise and blockwise recipes), padded and packed, and every output is compared with
the unpadded run: per-token log-probs, top-k, the train step's loss metrics and every parameter's gradient.
"""

from __future__ import annotations

import pytest
import torch

CFG = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=256)
LENGTHS = [37, 61, 90, 5, 23, 77, 50]  # odd lengths: no micro-batch is a multiple of 16 unpadded


def _batch():
    g = torch.Generator().manual_seed(0)
    n, t = len(LENGTHS), max(LENGTHS)
    tokens = torch.randint(1, 128, (n, t), generator=g)
    mask = torch.zeros(n, t)
    for i, length in enumerate(LENGTHS):
        tokens[i, length:] = 0
        mask[i, 3:length] = 1
    return dict(tokens=tokens, lengths=torch.tensor(LENGTHS), loss_mask=mask)


@pytest.fixture(scope="module")
def policy():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.05 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    pol = TrainablePolicy(MegatronModel(arch, ModelConfig(dtype="fp32", use_te="no")),
                          OptimConfig(lr=1e-3, adam_eps=1e-2, grad_clip=0.0))
    assert pol.base.token_multiple == 1  # no FP8, no sequence parallelism
    yield pol, arch, init
    torch.set_num_threads(threads)


def _run(pol, arch, init, multiple, pack):
    """Log-probs, top-k, the train step's metrics and gradients from the same weights at a token multiple; and the
    token counts the model saw."""
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state
    from megatron_s2d.policy import objectives as O

    load_hf_state(pol.module, arch, lambda k: init[k])
    pol.base.token_multiple, pol.base.pack_sequences = multiple, pack  # the model's forward settings
    seen = []
    hook = pol.module.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        batch = _batch()
        vals = pol.forward_values(batch, O.logprob_values(None, 1.0, topk=3), 512)
        n = batch["tokens"].shape[0]
        b = dict(batch, old_logprobs=vals["logprobs"] - 0.01, advantages=torch.linspace(-1, 1, n))
        norm = O.Normalisers(float(batch["loss_mask"].sum()), float(n))
        res = pol.train_step(b, O.policy_gradient(None, norm, eps_low=0.2, eps_high=0.28, temperature=1.0), 512)
    finally:
        hook.remove()
    grads = {name: p.main_grad.clone() for name, p in pol.module.named_parameters()}
    return vals, res, grads, seen


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_masked_padding_changes_no_logprob_loss_or_gradient(policy, pack):
    pol, arch, init = policy
    v0, r0, g0, seen0 = _run(pol, arch, init, 1, pack)
    if not pack:
        assert any(b * t % 16 for b, t in seen0), "the unpadded micro-batches must not already be FP8-shaped"
    for multiple in (16, 128):  # delayed / tensorwise, blockwise
        v, r, g, seen = _run(pol, arch, init, multiple, pack)
        assert all(t % multiple == 0 for _, t in seen), (multiple, seen)  # (B, T) or (1, S): T, S padded
        assert r.padded_tokens > r0.padded_tokens
        torch.testing.assert_close(v["logprobs"], v0["logprobs"], rtol=0, atol=2e-5)
        torch.testing.assert_close(v["topk_logprobs"], v0["topk_logprobs"], rtol=0, atol=2e-5)
        assert torch.equal(v["topk_ids"], v0["topk_ids"])
        assert v["logprobs"].shape == v0["logprobs"].shape == (len(LENGTHS), max(LENGTHS))
        for key in ("pg_loss_sum", "entropy_sum", "grad_norm"):
            assert r.metrics[key] == pytest.approx(r0.metrics[key], rel=1e-5, abs=1e-6), key
        for name, grad in g.items():
            torch.testing.assert_close(grad, g0[name], rtol=1e-4, atol=1e-6, msg=name)
    pol.token_multiple, pol.pack_sequences = 1, False
