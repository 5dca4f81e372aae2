"""The memory phases on one GPU (skipped without CUDA; the vLLM part also without vllm).

- ``TrainerMemory``: offloading frees the grad buffers and the optimizer's device tensors (Adam moments; the fp32
  main params of a bf16 model) from the device, keeps the weights there (with the fp32 optimizer the param groups
  *are* the weights: they must stay), and after restore the next update is bit-identical to a policy that never
  offloaded. On CPU only the grad-buffer half can run (tests/unit/rollout/test_colocation.py).
- ``VLLMEngine``: a level-2 sleep gives the engine's memory back; wake weights -> refit -> wake kv regenerates the
  same samples; ``close`` returns the memory and a second engine starts in the same process (vLLM's CuMem allocator
  asserts it holds nothing at start-up).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = dict(model_type="qwen3", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
           max_position_embeddings=256)


def _policy(arch, init, dtype):
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy

    p = TrainablePolicy(MegatronModel(arch, ModelConfig(dtype=dtype), micro_batch_tokens=512),
                        OptimConfig(lr=1e-3, warmup_updates=0))
    load_hf_state(p.module, arch, lambda n: init[n])
    p.weights_changed()  # bf16: the optimizer's fp32 main params copy the loaded weights
    return p


def _device_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grads_and_optimizer_leave_the_gpu_and_training_is_unchanged(dtype):
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.objectives import PolicyGradientLoss
    from megatron_s2d.rollout.colocation import TrainerMemory, _optimizers, free_cache
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.05 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    a, b = _policy(arch, init, dtype), _policy(arch, init, dtype)
    n, t = 8, 64
    tokens = torch.randint(0, 256, (n, t), generator=g)
    mask = torch.zeros(n, t)
    mask[:, 16:] = 1
    batch = RolloutBatch(tokens=tokens, lengths=torch.full((n,), t), loss_mask=mask, engine_logprobs=torch.zeros(n, t),
                         old_logprobs=torch.zeros(n, t), advantages=torch.linspace(-1, 1, n))
    loss = PolicyGradientLoss(temperature=1.0, eps_low=0.2, eps_high=0.2)
    for p in (a, b):  # the Adam moments exist from here on
        p.train(batch.with_(old_logprobs=p.logprobs(batch, 1.0)), loss, 1)

    weights = {id(w) for w in a.model.parameters()}
    grads = sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in a.model.buffers)
    optim = 0
    for opt in _optimizers(a.optimizer):
        optim += _device_bytes(v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
        optim += _device_bytes(p for grp in opt.optimizer.param_groups for p in grp["params"] if id(p) not in weights)
    assert optim > 0
    free_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    mem = TrainerMemory(a)
    mem.offload()
    free_cache()
    during = torch.cuda.memory_allocated()
    assert before - during >= 0.98 * (grads + optim), (before, during, grads, optim)
    assert all(w.is_cuda for w in a.model.parameters())  # the weights stay (fp32: they are the optimizer's params)
    mem.restore()
    assert torch.cuda.memory_allocated() >= before - 1024
    for p in (a, b):
        p.train(batch.with_(old_logprobs=p.logprobs(batch, 1.0)), loss, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.vllm
def test_vllm_sleeps_at_level_2_refits_on_wake_and_closes_clean(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from safetensors.torch import load_file

    from megatron_s2d.rollout.base import SamplingParams
    from megatron_s2d.rollout.vllm_engine import VLLMEngine
    from tests.functional.test_vllm_engine import _save_hf_model

    hf = tmp_path / "hf"
    _save_hf_model(hf)
    weights = load_file(str(next(hf.glob("*.safetensors"))))
    prompts, params = [[1, 2, 3], [40, 41, 42]], SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    free0 = torch.cuda.mem_get_info()[0]
    for _ in range(2):  # the second engine starts only if the first gave everything back
        engine = VLLMEngine(str(hf), max_model_len=64, dtype="float32", gpu_memory_utilization=0.3, sleep_mode=True,
                            enforce_eager=False)
        first = engine.generate(prompts, params)
        awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert not engine.weights_current
        assert torch.cuda.mem_get_info()[0] - awake > 0.2 * torch.cuda.mem_get_info()[1]  # most of its share is back
        engine.wake_up(["weights"])
        engine.update_weights((k, v.cuda()) for k, v in weights.items())  # level 2 kept nothing: refit all
        engine.wake_up(["kv_cache"])
        again = engine.generate(prompts, params)
        assert [[s.response_ids for s in grp] for grp in again.samples] == \
               [[s.response_ids for s in grp] for grp in first.samples]
        engine.close()
        assert torch.cuda.mem_get_info()[0] >= free0 - (1 << 30)  # within 1 GiB of where it started
