"""The stages' distillation targets on a real (tiny) megatron model: a student identical to its teacher gets zero
advantage and zero gradient in every mode, at T = 0.7 and T = 1, through the same calls the loops make (teacher
scoring, student log-probs, Policy.train). And the policy a stage builds schedules its LR over steps x updates."""

import pytest
import torch

from tests.distributed._launch import run_distributed

CFG = dict(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
           max_position_embeddings=64)


def _job(rank, world, temperature):
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state
    from megatron_s2d.config import (ClipConfig, GRPOStageConfig, ModelConfig, OPDConfig, OPDStageConfig, OptimConfig,
                                     RolloutConfig)
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.objectives import ForwardKLLoss
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.stages.job import trainable_policy
    from megatron_s2d.stages.opd import SampledOPD, TopkOPD, opd_mode

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.3 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    mcfg = ModelConfig(dtype="fp32")
    rollout = RolloutConfig(engine="megatron", temperature=temperature, max_new_tokens=8)
    stage = OPDStageConfig(name="opd", teacher="base", samples_per_prompt=2, rollout=rollout, micro_batch_tokens=64,
                           optim=OptimConfig(lr=1e-3), clip=ClipConfig(), opd=OPDConfig(topk=4))
    start = MegatronModel(arch, mcfg, seed=0, micro_batch_tokens=stage.micro_batch_tokens)
    load_hf_state(start.module, arch, lambda n: init[n])
    student = trainable_policy(start, stage)
    frozen = MegatronModel(arch, mcfg, micro_batch_tokens=64)
    load_hf_state(frozen.module, arch, lambda n: init[n])
    teacher = frozen  # at the job's own layout the model is the scorer

    n, t = 4, 12
    tokens = torch.randint(0, 64, (n, t), generator=g)
    mask = torch.zeros(n, t)
    mask[:, 5:] = 1
    batch = RolloutBatch(tokens=tokens, lengths=torch.full((n,), t), loss_mask=mask, engine_logprobs=torch.zeros(n, t))
    out = {}
    # sampled OPD: the teacher's log-prob of each token is the dense reward
    old = student.logprobs(batch, temperature)
    sampled = opd_mode(stage)
    assert isinstance(sampled, SampledOPD)
    b, _ = sampled.targets(teacher, batch.with_(old_logprobs=old), None)
    out["sampled_adv"] = float(b.advantages.abs().max())
    out["sampled_grad"] = student.train(b, sampled.loss(), 1)["grad_norm"]
    # top-k OPD: reverse KL over the student's top-k ids (what its engine records, at T)
    load_hf_state(student.module, arch, lambda n: init[n])  # Adam turns even a 1e-6 gradient into an lr-sized step
    vals, ids = student.topk(batch, 4, temperature)
    topk = TopkOPD(temperature=temperature, topk=4)
    b, _ = topk.targets(teacher, batch.with_(topk_ids=ids, topk_logprobs=vals, old_logprobs=old), None)
    res = student.train(b, topk.loss(), 1)
    out["topk_kl"], out["topk_grad"] = res["kl_mean"], res["grad_norm"]
    # forward-KL warmup: the teacher's top-k at T (its engine's cache)
    load_hf_state(student.module, arch, lambda n: init[n])
    tv, ti = teacher.topk(batch, 4, temperature)
    res = student.train(batch.with_(topk_ids=ti, topk_logprobs=tv),
                        ForwardKLLoss(mode="topk", temperature=temperature), 1)
    out["fkl_kl"], out["fkl_grad"] = res["kl_mean"], res["grad_norm"]
    # the policy a stage builds schedules over all of its optimizer updates
    rl = GRPOStageConfig(name="rl", steps=10, updates_per_step=4, samples_per_prompt=2,
                         optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_updates=2))
    out["decay_updates"] = trainable_policy(MegatronModel(arch, mcfg), rl).scheduler.lr_decay_steps
    return out


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_identical_student_gets_no_signal_in_any_mode(temperature):
    out = run_distributed(_job, world_size=1, temperature=temperature, timeout=300)[0]
    assert out["sampled_adv"] == 0 and out["sampled_grad"] == 0
    assert abs(out["topk_kl"]) < 1e-6 and out["topk_grad"] < 1e-5
    assert abs(out["fkl_kl"]) < 1e-5 and out["fkl_grad"] < 1e-4
    assert out["decay_updates"] == 40  # steps x updates_per_step (it was `steps`: 10)
