"""The learning rate of every optimizer update against a hand-written schedule whose horizon is the stage's total
number of updates (steps x updates_per_step), with warmup counted in updates. Before the fix the horizon was
``steps``: a cosine schedule with steps=10, updates_per_step=4 reached 0 after 10 of its 40 updates."""

import math

import pytest
import torch

from tests.distributed._launch import run_distributed

CFG = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
           max_position_embeddings=64)


def expected_lr(u: int, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Update u (0-based) of ``total``: linear warmup lr * u / warmup, then constant or cosine to min_lr at total."""
    if u < warmup:
        return lr * u / warmup
    if schedule == "constant":
        return lr
    ratio = (u - warmup) / (total - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (lr - min_lr)


def _job(rank, world, schedule, steps, updates, warmup, skip_at):
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_updates=warmup, schedule=schedule)
    pol = TrainablePolicy(MegatronModel(arch_from_hf_config(CFG), ModelConfig(dtype="fp32"), micro_batch_tokens=256),
                          optim, total_updates=steps * updates)
    n, t = 2 * updates, 10
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(steps):
        tokens = torch.randint(0, 64, (n, t), generator=g)
        mask = torch.ones(n, t)
        mask[:, 0] = 0
        if step == skip_at:
            mask.zero_()  # no loss token anywhere this step: every update is skipped, the schedule advances
        batch = RolloutBatch(tokens=tokens, lengths=torch.full((n,), t), loss_mask=mask,
                             engine_logprobs=torch.zeros(n, t), old_logprobs=torch.zeros(n, t),
                             advantages=torch.randn(n, generator=g))
        lrs = []
        orig = pol.train_step

        def spy(*a, **k):
            res = orig(*a, **k)
            lrs.append(res.metrics["lr"])
            return res

        pol.train_step = spy
        out = pol.train(batch, O.PolicyGradientLoss(temperature=1.0, eps_low=0.2, eps_high=0.2), updates)
        pol.train_step = orig
        seen.append((lrs, out["updates"]))
    return seen


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_of_every_update_follows_the_schedule_over_all_updates(schedule):
    steps, updates, warmup = 10, 4, 3
    seen = run_distributed(_job, world_size=1, schedule=schedule, steps=steps, updates=updates, warmup=warmup,
                           skip_at=5)[0]
    u = 0
    for step, (lrs, done) in enumerate(seen):
        if step == 5:
            assert lrs == [] and done == 0  # skipped, yet the next step's rates are the planned ones
            u += updates
            continue
        assert done == updates
        want = [expected_lr(u + k, 1e-3, 1e-4, warmup, steps * updates, schedule) for k in range(updates)]
        assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12), (step, lrs, want)
        u += updates
    if schedule == "cosine":  # still well above min_lr in the last step: the horizon is the last update
        assert seen[-1][0][-1] > 1e-4
