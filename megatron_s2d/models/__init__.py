"""Llama-3.x / Qwen3 dense models as megatron-core GPTModel, built from an HF config.json; the facts about each
family: its state-dict adapter (``state_dict``: HF <-> megatron names and TP layout) and HF config (``llama``,
``qwen3``).

``arch`` (config parsing and layout checks) imports no torch/megatron, so the launcher stays light on a login node;
``build`` (the GPTModel) is imported on first use.
"""

from megatron_s2d.models.arch import ArchSpec, arch_from_hf_config, check_layout, load_arch

__all__ = ["ArchSpec", "ModelOptions", "arch_from_hf_config", "build_gpt_model", "check_layout", "load_arch"]


def __getattr__(name):
    if name in ("ModelOptions", "build_gpt_model"):
        from megatron_s2d.models import build

        return getattr(build, name)
    raise AttributeError(name)
