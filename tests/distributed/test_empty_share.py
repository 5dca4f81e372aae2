"""A data-parallel rank whose share of the step is empty (GRPO dynamic sampling dropped all its groups) takes part in
the step's collectives with a zero-weight row: no StopIteration, no hang, and the update equals the one a single
process makes from the non-empty rank's rows alone. Before the fix the empty rank raised StopIteration in megatron's
schedule and the other rank waited in the gradient all-reduce until the collective timeout."""

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = pytest.mark.distributed

CFG = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
           max_position_embeddings=64)


def _rows(n, t=12):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (n, t), generator=g)
    lengths = torch.randint(6, t + 1, (n,), generator=g)
    mask = torch.zeros(n, t)
    for i in range(n):
        mask[i, 3:lengths[i]] = 1
    from megatron_s2d.policy.batch import RolloutBatch

    return RolloutBatch(tokens=tokens, lengths=lengths, loss_mask=mask, engine_logprobs=torch.zeros(n, t),
                        old_logprobs=torch.zeros(n, t), advantages=torch.randn(n, generator=g))


def _job(rank, world, keep_on_rank1: int, updates: int):
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import export_hf_state, load_hf_state

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.05 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    pol = TrainablePolicy(MegatronModel(arch, ModelConfig(dtype="fp32"), micro_batch_tokens=64),
                          OptimConfig(lr=1e-2, adam_eps=1e-2, grad_clip=0.0), total_updates=updates)
    load_hf_state(pol.module, arch, lambda n: init[n])
    full = _rows(6)
    if world == 1:
        batch = full  # the reference: one process, the non-empty rank's rows
    else:
        rows = list(range(6)) if rank == 0 else list(range(keep_on_rank1))
        batch = (full if rank == 0 else _rows(6)).rows(rows)
    metrics = pol.train(batch, O.PolicyGradientLoss(temperature=1.0, eps_low=0.2, eps_high=0.2), updates)
    return {k: v.clone() for k, v in export_hf_state(pol.module, arch)}, metrics["updates"]


@pytest.mark.parametrize("updates", [1, 2])
def test_rank_with_no_rows_joins_the_update(updates):
    ref, n_ref = run_distributed(_job, world_size=1, keep_on_rank1=0, updates=updates)[0]
    out = run_distributed(_job, world_size=2, keep_on_rank1=0, updates=updates, timeout=300)
    assert out[0][1] == out[1][1] == n_ref == updates
    for name, v in ref.items():
        torch.testing.assert_close(out[0][0][name], v, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(out[1][0][name], v, rtol=1e-5, atol=1e-6, msg=name)


def test_rank_with_fewer_rows_than_updates():
    """Rank 1 keeps 1 row for 3 updates: its 2nd and 3rd pieces are empty; both ranks still make 3 updates."""
    out = run_distributed(_job, world_size=2, keep_on_rank1=1, updates=3, timeout=300)
    assert out[0][1] == out[1][1] == 3
    for name, v in out[0][0].items():
        torch.testing.assert_close(out[1][0][name], v, msg=name)  # DP ranks stay in sync
