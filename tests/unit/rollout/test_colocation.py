"""The memory phases around a generation (rollout.colocation) on a real megatron policy, CPU: while the megatron
sampler generates, the DDP grad buffers' storage is released (0 bytes); afterwards it is back, zeroed, the weights are
bit-identical, and the next train step gives exactly the weights of a policy that never offloaded. The phases come
in the plan's order, a nested phase joins the outer one, and a failing generation still restores the trainer.
(Optimizer offload moves only CUDA tensors: tests/gpu/test_colocation_gpu.py.)"""

import torch

from tests.distributed._launch import run_distributed

CFG = dict(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
           max_position_embeddings=64)


def _policy(arch, init):
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy

    p = TrainablePolicy(MegatronModel(arch, ModelConfig(dtype="fp32"), micro_batch_tokens=256),
                        OptimConfig(lr=1e-2, warmup_updates=0))
    load_hf_state(p.module, arch, lambda n: init[n])
    return p


def _job(rank, world):
    from megatron_s2d.errors import InternalError
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.objectives import PolicyGradientLoss
    from megatron_s2d.rollout.base import SamplingParams
    from megatron_s2d.rollout.colocation import ColocatedEngine, TrainerMemory
    from megatron_s2d.rollout.megatron_sampler import MegatronSampler
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.3 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    offloaded, plain = _policy(arch, init), _policy(arch, init)

    n, t = 4, 12
    tokens = torch.randint(0, 64, (n, t), generator=g)
    mask = torch.zeros(n, t)
    mask[:, 5:] = 1
    batch = RolloutBatch(tokens=tokens, lengths=torch.full((n,), t), loss_mask=mask,
                         engine_logprobs=torch.zeros(n, t), old_logprobs=torch.zeros(n, t),
                         advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    loss = PolicyGradientLoss(temperature=1.0, eps_low=0.2, eps_high=0.2)
    for p in (offloaded, plain):  # Adam state and non-zero grads exist before the first offload
        p.train(batch.with_(old_logprobs=p.logprobs(batch, 1.0)), loss, 1)

    buffers = offloaded.model.buffers
    sizes = [b.grad_data.untyped_storage().size() for b in buffers]
    seen = {}

    class Probe(MegatronSampler):  # the real sampler; it records what the grad buffers hold while it generates
        def generate(self, prompts, params):
            seen.setdefault("during", []).append([b.grad_data.untyped_storage().size() for b in buffers])
            if params.seed == 666:
                raise RuntimeError("generation failed")
            return super().generate(prompts, params)

    before = {k: v.detach().clone() for k, v in offloaded.module.state_dict().items() if torch.is_tensor(v)}
    trace: list[str] = []
    engine = ColocatedEngine(Probe(offloaded.module, arch, eos_token_ids=[3], pad_token_id=0),
                             trainer=TrainerMemory(offloaded), trace=trace)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=5)
    result = engine.generate([[1, 2, 3], [4, 5]], params)
    out = {"samples": [len(s) for s in result.samples], "sync": result.sync, "sizes": sizes,
           "during": seen["during"][0], "after": [b.grad_data.untyped_storage().size() for b in buffers],
           "grads_zero": all(bool((b.grad_data == 0).all()) for b in buffers),
           "weights_same": all(torch.equal(before[k], v) for k, v in offloaded.module.state_dict().items()
                               if torch.is_tensor(v)),
           "trace": list(trace)}
    trace.clear()
    with engine.generation():  # one phase around several generations (the teacher's rollouts, the evaluation)
        engine.generate([[1, 2]], params)
        engine.generate([[3, 4]], params)
    out["nested_trace"] = list(trace)
    trace.clear()
    try:
        engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2, seed=666))
    except RuntimeError:
        pass
    out["failed_trace"], out["restored_after_failure"] = list(trace), not engine.trainer.offloaded
    out["after_failure"] = [b.grad_data.untyped_storage().size() for b in buffers]
    try:
        engine.trainer.restore()
    except InternalError as e:
        out["double_restore"] = str(e)

    # the next update: exactly what a policy that never offloaded computes
    for p in (offloaded, plain):
        p.train(batch.with_(old_logprobs=p.logprobs(batch, 1.0)), loss, 1)
    out["trained_same"] = all(torch.equal(a, b) for a, b in zip(offloaded.model.parameters(), plain.model.parameters()))
    out["trained_moved"] = not all(torch.equal(before[k], v) for k, v in offloaded.module.state_dict().items()
                                   if torch.is_tensor(v))
    return out


def test_grad_buffers_are_released_while_generating_and_training_is_unchanged():
    out = run_distributed(_job, world_size=1, timeout=300)[0]
    assert out["samples"] == [2, 2] and out["sync"] == {}  # the megatron sampler reads the live weights: no refit
    assert all(s > 0 for s in out["sizes"])
    assert out["during"] == [0] * len(out["sizes"])  # storage released while the sampler generates
    assert out["after"] == out["sizes"] and out["grads_zero"]  # back, zeroed (megatron's restore_grad_buffers)
    assert out["weights_same"]
    assert out["trace"] == ["offload", "generate", "restore"]
    assert out["nested_trace"] == ["offload", "generate", "generate", "restore"]
    assert out["failed_trace"] == ["offload", "restore"] and out["restored_after_failure"]
    assert out["after_failure"] == out["sizes"]
    assert "nothing was offloaded" in out["double_restore"]
    assert out["trained_same"] and out["trained_moved"]
