"""Toy model configs: real Qwen3 / Llama-3.1 architectures, shapes, validation."""

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.toy import models as M

IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("arch", M.ARCHS)
@pytest.mark.parametrize("spec", [M.TEACHER_SPEC, M.STUDENT_SPEC])
def test_configs_build_models_that_run(arch, spec):
    from transformers import AutoModelForCausalLM

    cfg = M.make_config(spec, 368, arch=arch, **IDS)
    assert cfg.model_type == arch and cfg.head_dim == 32 and cfg.vocab_size == 368
    assert cfg.num_attention_heads // cfg.num_key_value_heads >= 2  # GQA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    logits = model(torch.tensor([[1, 5, 9, 11]])).logits  # (B, T, V)
    assert logits.shape == (1, 4, 368)
    if arch == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")  # Qwen3 q/k-norm


def test_teacher_is_larger_than_student():
    assert M.TEACHER_SPEC.hidden_size > M.STUDENT_SPEC.hidden_size
    assert M.TEACHER_SPEC.num_layers > M.STUDENT_SPEC.num_layers


def test_llama_variant_uses_llama3_rope_scaling():
    cfg = M.make_config(M.STUDENT_SPEC, 368, arch="llama", **IDS)
    rope = cfg.to_dict().get("rope_parameters") or cfg.to_dict()["rope_scaling"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == M.LLAMA3_ROPE["factor"]


def test_bad_configs_raise():
    with pytest.raises(S2DError, match="multiple of 16"):
        M.make_config(M.STUDENT_SPEC, 361, **IDS)
    with pytest.raises(S2DError, match="arch"):
        M.make_config(M.STUDENT_SPEC, 368, arch="gpt2", **IDS)
    with pytest.raises(S2DError, match="head_dim"):
        M.make_config(M.ToyModelSpec(64, 2, 4, 2, 16, 128), 368, **IDS)
    with pytest.raises(S2DError, match="num_kv_heads"):
        M.make_config(M.ToyModelSpec(96, 2, 3, 2, 32, 128), 368, **IDS)
