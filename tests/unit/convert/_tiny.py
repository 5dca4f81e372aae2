"""Tiny HF models for conversion tests, built locally (no hub): Llama-3.1 (llama3 rope scaling, untied) and Qwen3
(tied and untied); head_dim 32, 2 layers, hidden 64, vocab 256, random weights from a seed (layer norms too, so a
swapped norm would show), saved with ``save_pretrained`` as one file or as several small shards, plus placeholder
tokenizer files to check that they are carried through a conversion."""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = ("llama", "qwen3_tied", "qwen3_untied")
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel"}}\n',
                   "tokenizer_config.json": '{"model_max_length": 128}\n',
                   "chat_template.jinja": "{{ messages }}\n"}


def hf_config(kind: str):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if kind in ("qwen3_tied", "qwen3_untied"):
        return Qwen3Config(**common, rope_theta=1e6, tie_word_embeddings=kind == "qwen3_tied")
    raise ValueError(kind)


def make_hf_model(kind: str, out_dir: Path, sharded: bool = False, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> Path:
    """Build, randomise and save a tiny model; returns ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 / p.shape[-1] ** 0.5)
    model.to(dtype).save_pretrained(out_dir, max_shard_size="150KB" if sharded else "10GB")
    for name, text in TOKENIZER_FILES.items():
        (Path(out_dir) / name).write_text(text)
    return Path(out_dir)


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (single file or sharded), by name."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(hf_dir / f)))
    return out


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), f"names differ: {sorted(set(got) ^ set(want))}"
    for name, t in want.items():
        assert got[name].dtype == t.dtype, (name, got[name].dtype, t.dtype)
        assert torch.equal(got[name], t), f"tensor {name} differs"


def tokens(batch: int = 2, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq_len), generator=g)


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits
