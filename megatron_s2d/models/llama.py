"""Llama-3.x specifics: the HF ``config.json`` regenerated from an :class:`ArchSpec` (tensor names: state_dict.py).

Llama and Qwen3 dense share every tensor name and layout; they differ only in q/k-norm (Qwen3), the default for
tied embeddings and RoPE scaling, all of which the ArchSpec carries. The config is built through transformers' own
config class so that whatever the installed transformers writes (``rope_parameters`` in v5, ``rope_scaling`` in v4)
is what we write.
"""

from __future__ import annotations

from typing import Any

from megatron_s2d.models.arch import ArchSpec

ARCHITECTURE = "LlamaForCausalLM"
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def common_config_kwargs(arch: ArchSpec) -> dict[str, Any]:
    """HF config fields shared by Llama and Qwen3."""
    kw: dict[str, Any] = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, rms_norm_eps=arch.rms_norm_eps,
        rope_theta=arch.rope_theta, max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings, hidden_act="silu", attention_bias=False,
        bos_token_id=arch.bos_token_id, eos_token_id=arch.eos_token_id,
    )
    if arch.rope_scaling is not None:
        rs = arch.rope_scaling
        kw["rope_scaling"] = {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return kw


def finish_config(cfg_dict: dict[str, Any], architecture: str, dtype: str) -> dict[str, Any]:
    """Add the fields ``save_pretrained`` would add: architectures and the weight dtype (v4 and v5 spellings)."""
    d = dict(cfg_dict)
    d["architectures"] = [architecture]
    d["torch_dtype"] = d["dtype"] = DTYPE_NAMES[dtype]
    return d


def hf_config(arch: ArchSpec, dtype: str) -> dict[str, Any]:
    from transformers import LlamaConfig

    kw = common_config_kwargs(arch)
    kw["mlp_bias"] = False
    return finish_config(LlamaConfig(**kw).to_dict(), ARCHITECTURE, dtype)
