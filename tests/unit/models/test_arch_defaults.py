"""A config.json that omits a field gets the default of transformers' own config class, as from_pretrained would."""

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import arch_from_hf_config

SHAPE = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _library(model_type: str, **fields):
    from transformers import LlamaConfig, Qwen3Config

    return {"qwen3": Qwen3Config, "llama": LlamaConfig}[model_type](**fields)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_omitted_fields_take_the_library_default(model_type):
    # only the model's shape (+ a kv-head count Qwen3's default of 32 would not divide): everything else omitted
    cfg = dict(model_type=model_type, **SHAPE, num_key_value_heads=2)
    arch = arch_from_hf_config(cfg)
    lib = _library(model_type, **SHAPE, num_key_value_heads=2)
    assert arch.tie_word_embeddings is bool(lib.tie_word_embeddings) is False  # Qwen3Config: untied by default
    assert arch.head_dim == (lib.head_dim or lib.hidden_size // lib.num_attention_heads)
    assert arch.max_position_embeddings == lib.max_position_embeddings
    assert arch.rms_norm_eps == lib.rms_norm_eps
    assert arch.rope_theta == lib.rope_parameters["rope_theta"]


def test_qwen3_library_defaults_are_not_llamas():
    """Qwen3Config's head_dim default is 128 (not hidden / heads) and it is untied: a model omitting them must be
    built that way, or its weights will not fit."""
    arch = arch_from_hf_config(dict(model_type="qwen3", **SHAPE, num_key_value_heads=2))
    assert arch.head_dim == 128 and not arch.tie_word_embeddings and arch.max_position_embeddings == 32768
    llama = arch_from_hf_config(dict(model_type="llama", **SHAPE))
    assert llama.head_dim == 16 and llama.num_kv_heads == 4 and llama.max_position_embeddings == 2048


def test_explicit_fields_win_and_shape_is_required():
    arch = arch_from_hf_config(dict(model_type="qwen3", **SHAPE, num_key_value_heads=2, tie_word_embeddings=True,
                                    head_dim=32))
    assert arch.tie_word_embeddings and arch.head_dim == 32
    with pytest.raises(S2DError, match="required field 'vocab_size'"):
        arch_from_hf_config(dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4))
