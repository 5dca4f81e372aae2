"""Architecture description shared by model building and checkpoint conversion.

An :class:`ArchSpec` is the small, validated subset of an HF ``config.json`` that we support (Llama-3.x and Qwen3
dense). Everything downstream (megatron ``TransformerConfig``, weight mappings, layout checks) is derived from it, so
an unsupported feature is refused in exactly one place with an error naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_s2d.errors import S2DError

SUPPORTED = ("llama", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style ("llama3") RoPE frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # "llama" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3 per-head RMSNorm on q and k
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def num_params(self) -> int:
        """Parameter count (exact for this architecture family)."""
        h, L = self.hidden_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.qk_norm else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ArchSpec":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return ArchSpec(**d)


def _require(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise S2DError(f"{where}: required field '{key}' is missing")
    return cfg[key]


def _library_config(model_type: str, cfg: dict[str, Any], where: str):
    """``cfg`` as transformers' own config class of ``model_type`` (Qwen3Config / LlamaConfig), so every field the
    file omits takes the library's default, exactly as ``from_pretrained`` would load it: e.g. Qwen3Config defaults to
    untied embeddings, head_dim 128, 32 key/value heads and 32768 positions; LlamaConfig to head_dim = hidden / heads
    and key/value heads = attention heads."""
    from transformers import LlamaConfig, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[model_type]
    try:
        return cls(**{k: v for k, v in cfg.items() if k != "model_type"})
    except Exception as e:  # TypeError / ValueError / huggingface_hub's strict validation errors
        raise S2DError(f"{where}: not a valid {cls.__name__} (transformers refuses it too): {e}") from e


def arch_from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> ArchSpec:
    """Validate an HF config dict and return the :class:`ArchSpec`; refuse what we do not support, naming the field.
    Fields the dict omits take the defaults of transformers' config class for its ``model_type``."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise S2DError(
            f"{where}: field 'model_type' = {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    # Features we refuse outright, each named by its HF field.
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            raise S2DError(f"{where}: field '{key}' = {cfg[key]} (mixture of experts) is not supported")
    for key in ("num_attention_heads", "hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers"):
        _require(cfg, key, where)  # the shape of a model: never taken from a library default
    hf = _library_config(model_type, cfg, where)
    if getattr(hf, "use_sliding_window", False) or (model_type == "llama" and getattr(hf, "sliding_window", None)):
        raise S2DError(f"{where}: field 'use_sliding_window'/'sliding_window' (sliding-window attention) is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(hf, key, False):
            raise S2DError(f"{where}: field '{key}' = true is not supported (Llama-3/Qwen3 use no linear biases)")
    act = hf.hidden_act
    if act != "silu":
        raise S2DError(f"{where}: field 'hidden_act' = {act!r} is not supported (only 'silu' / SwiGLU)")
    if getattr(hf, "pretraining_tp", 1) not in (1, None):
        raise S2DError(f"{where}: field 'pretraining_tp' = {hf.pretraining_tp} is not supported (must be 1)")
    heads, hidden = int(hf.num_attention_heads), int(hf.hidden_size)
    kv = int(hf.num_key_value_heads or heads)
    if heads % kv:
        raise S2DError(f"{where}: 'num_attention_heads' ({heads}) must be a multiple of 'num_key_value_heads' ({kv})")
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    # transformers 5 folds rope_theta / rope_scaling into rope_parameters; 4.x keeps them apart
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_scaling = None
    rtype = rope.get("rope_type", rope.get("type"))
    if rtype in (None, "default"):
        rope_scaling = None
    elif rtype == "llama3":
        rope_scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
    else:
        raise S2DError(f"{where}: field 'rope_scaling.rope_type' = {rtype!r} is not supported (only 'llama3')")
    rope_theta = getattr(hf, "rope_theta", None) or rope.get("rope_theta")
    if rope_theta is None:
        raise S2DError(f"{where}: no rope_theta in the config or in the library's defaults")
    return ArchSpec(
        model_type=model_type, vocab_size=int(hf.vocab_size), hidden_size=hidden,
        intermediate_size=int(hf.intermediate_size), num_layers=int(hf.num_hidden_layers), num_attention_heads=heads,
        num_kv_heads=kv, head_dim=int(head_dim), rms_norm_eps=float(hf.rms_norm_eps), rope_theta=float(rope_theta),
        max_position_embeddings=int(hf.max_position_embeddings), tie_word_embeddings=bool(hf.tie_word_embeddings),
        qk_norm=(model_type == "qwen3"), rope_scaling=rope_scaling, bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )


def load_arch(hf_dir: str | Path) -> ArchSpec:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise S2DError(f"{path}: no config.json (is this an HF model folder?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise S2DError(f"{path}: not valid JSON ({e})") from e
    return arch_from_hf_config(cfg, where=str(path))


def check_layout(arch: ArchSpec, tp: int, pp: int, where: str = "layout") -> None:
    """Refuse a TP/PP layout that does not divide the model, naming what does not divide."""
    if tp < 1 or pp < 1:
        raise S2DError(f"{where}: tensor_parallel ({tp}) and pipeline_parallel ({pp}) must be >= 1")
    checks = [
        ("num_attention_heads", arch.num_attention_heads, tp),
        ("num_key_value_heads (query groups)", arch.num_kv_heads, tp),
        ("vocab_size", arch.vocab_size, tp),
        ("intermediate_size", arch.intermediate_size, tp),
        ("num_hidden_layers", arch.num_layers, pp),
    ]
    for name, value, div in checks:
        if value % div:
            what = "tensor_parallel" if div == tp and name != "num_hidden_layers" else "pipeline_parallel"
            raise S2DError(f"{where}: {name} = {value} is not divisible by {what} = {div}")


def llama3_inv_freq(head_dim: int, theta: float, rs: RopeScaling | None):
    """RoPE inverse frequencies, with Llama-3.1 scaling (same formula as HF's `_compute_llama3_parameters`)."""
    import torch

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rs is None:
        return inv
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)
