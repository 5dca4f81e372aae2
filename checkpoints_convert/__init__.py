"""The ``s2d convert`` CLI (HF <-> megatron-core, Llama-3.x and Qwen3 dense) and numerical verification.

    s2d convert hf-to-megatron --hf DIR --out DIR --tp N --pp M
    s2d convert megatron-to-hf --megatron DIR --out DIR
    s2d convert verify --hf DIR --megatron DIR --tp N --pp M        (also: python -m checkpoints_convert ...)

The conversions themselves are checkpoint formats and live in ``megatron_s2d.checkpoint`` (hf_to_megatron.py,
megatron_to_hf.py, hf_io.py, dcp_io.py), the HF <-> megatron name/layout table in ``megatron_s2d.models.state_dict``;
this package is the CLI (cli.py) and the logit comparison (verify.py), depending on them one way.
"""

from checkpoints_convert.cli import add_convert_subcommands, main
from checkpoints_convert.verify import VerifyResult, verify_logits
from megatron_s2d.checkpoint.hf_to_megatron import ConversionReport, convert_hf_to_megatron, plan_hf_to_megatron
from megatron_s2d.checkpoint.megatron_to_hf import convert_megatron_to_hf

__all__ = [
    "ConversionReport", "VerifyResult", "add_convert_subcommands", "convert_hf_to_megatron", "convert_megatron_to_hf",
    "main", "plan_hf_to_megatron", "verify_logits",
]
