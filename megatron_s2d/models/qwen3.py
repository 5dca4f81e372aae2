"""Qwen3 (dense) specifics: the HF ``config.json`` regenerated from an :class:`ArchSpec`.

Tensor names are Llama's plus per-head ``self_attn.{q,k}_norm`` (mapping.py adds them when ``arch.qk_norm``).
"""

from __future__ import annotations

from typing import Any

from megatron_s2d.models.llama import common_config_kwargs, finish_config
from megatron_s2d.models.arch import ArchSpec

ARCHITECTURE = "Qwen3ForCausalLM"


def hf_config(arch: ArchSpec, dtype: str) -> dict[str, Any]:
    from transformers import Qwen3Config

    kw = common_config_kwargs(arch)
    kw["use_sliding_window"] = False
    return finish_config(Qwen3Config(**kw).to_dict(), ARCHITECTURE, dtype)
