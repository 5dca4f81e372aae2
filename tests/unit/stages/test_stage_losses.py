"""The policy-gradient losses the stages build from their configs carry the plan's dual clip (``clip.dual_clip_c``,
verl's c = 3 by default): a token with A < 0 whose ratio ran past c gets no gradient, as in verl; with
``dual_clip_c: 0`` it does. Before, no stage passed a dual clip to the loss (the loss function had it, unused)."""

import pytest
import torch

from megatron_s2d.config.schema import ClipConfig, GRPOStageConfig, OPDStageConfig
from megatron_s2d.policy import objectives as O
from megatron_s2d.stages.grpo import grpo_loss
from megatron_s2d.stages.opd import opd_mode

T, V = 4, 8


def _logit_grad(loss: O.PolicyGradientLoss) -> torch.Tensor:
    """d loss / d logits (T, V) for one sequence with A = -1 on its 3 loss tokens; the token at position 2 has ratio
    e^2 = 7.4 (the policy moved far from the one that sampled it), the others ratio 1. Logits at position t - 1
    predict the token at t."""
    logits = torch.randn(1, T, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mb = {"tokens": torch.tensor([[0, 1, 2, 3]]), "lengths": torch.tensor([T]),
          "loss_mask": torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)}
    old = O.logprob_values(None, 1.0)(logits, mb)[1]["logprobs"].clone()
    old[0, 2] -= 2.0
    mb.update(old_logprobs=old, advantages=torch.full((1, T), -1.0, dtype=torch.float64))
    z = logits.clone().requires_grad_(True)
    value, metrics = loss.objective(None, O.Normalisers(num_tokens=3.0, num_seqs=1.0))(z, mb)
    value.backward()
    return z.grad[0]


@pytest.mark.parametrize("build", [
    lambda clip: grpo_loss(GRPOStageConfig(name="rl", clip=clip)),
    lambda clip: opd_mode(OPDStageConfig(name="opd", teacher="base", samples_per_prompt=2, clip=clip)).loss(),
], ids=["grpo", "sampled_opd"])
def test_stage_losses_apply_the_plans_dual_clip(build):
    default = build(ClipConfig())
    assert default.dual_clip_c == 3.0
    g = _logit_grad(default)
    assert g[1].abs().max() == 0  # ratio 7.4 > c = 3 with A < 0: the loss is the constant -c A there
    assert g[0].abs().max() > 0 and g[2].abs().max() > 0  # the ratio-1 tokens still train
    off = build(ClipConfig(dual_clip_c=0))
    assert off.dual_clip_c is None
    assert _logit_grad(off)[1].abs().max() > 0  # without the dual clip the token is pushed down without bound
