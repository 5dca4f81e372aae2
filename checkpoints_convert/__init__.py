"""HF <-> megatron-core checkpoint conversion for Llama-3.x and Qwen3 (dense), streaming, with numerical verify.

    python -m checkpoints_convert hf-to-megatron --hf DIR --out DIR --tp N --pp M
    python -m checkpoints_convert megatron-to-hf --megatron DIR --out DIR
    python -m checkpoints_convert verify --hf DIR --megatron DIR --tp N --pp M

Files: mapping.py (the name / shape / TP layout table), llama.py + qwen3.py (config.json per family), hf_io.py
(streaming safetensors), dcp_io.py (streaming dist checkpoints), hf_to_megatron.py, megatron_to_hf.py, verify.py,
cli.py. Live-model save / load / HF export live in ``megatron_s2d.runtime.model_ckpt``.
"""

from checkpoints_convert.cli import add_convert_subcommands, main
from checkpoints_convert.hf_to_megatron import ConversionReport, convert_hf_to_megatron, plan_hf_to_megatron
from checkpoints_convert.megatron_to_hf import convert_megatron_to_hf
from checkpoints_convert.verify import VerifyResult, verify_logits

__all__ = [
    "ConversionReport", "VerifyResult", "add_convert_subcommands", "convert_hf_to_megatron", "convert_megatron_to_hf",
    "main", "plan_hf_to_megatron", "verify_logits",
]
