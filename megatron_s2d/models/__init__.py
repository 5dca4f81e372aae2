"""Llama-3.x / Qwen3 dense models as megatron-core GPTModel, built from an HF config.json."""

from megatron_s2d.models.arch import ArchSpec, arch_from_hf_config, check_layout, load_arch
from megatron_s2d.models.build import ModelOptions, build_gpt_model

__all__ = ["ArchSpec", "ModelOptions", "arch_from_hf_config", "build_gpt_model", "check_layout", "load_arch"]
