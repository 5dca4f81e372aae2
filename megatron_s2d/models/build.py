"""Build a megatron-core ``GPTModel`` (one pipeline stage of it) from an :class:`ArchSpec`.

Llama-3.x and Qwen3 dense share one builder: they differ only in q/k RMSNorm (Qwen3), tied embeddings and RoPE
scaling, all carried by the ArchSpec. The Transformer Engine layer spec is used when TE imports and a GPU is present
(``use_te="auto"``); otherwise megatron-core's local spec (torch kernels), which is what runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec, check_layout, llama3_inv_freq


@dataclass(frozen=True)
class ModelOptions:
    """How to instantiate (not what to instantiate: that is the ArchSpec)."""

    dtype: str = "fp32"  # "fp32" | "bf16": parameter/compute dtype
    use_te: str = "auto"  # "auto" | "yes" | "no"
    fp8: str | None = None  # None | "delayed" | "tensorwise" | "blockwise" (TE recipes; needs use_te)
    recompute: bool = False  # full activation recomputation per layer
    init_std: float = 0.02
    seed: int = 1234
    initialize: bool = True  # random-initialise the weights; False when a checkpoint is loaded right after


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _resolve_te(opts: ModelOptions) -> bool:
    if opts.use_te == "no":
        return False
    ok = te_available()
    if opts.use_te == "yes" and not ok:
        raise S2DError(
            "model.use_te = 'yes' but Transformer Engine is not importable on a CUDA machine: "
            "install the GPU extra (`pip install megatron-s2d[gpu]`) or set model.use_te=auto"
        )
    if opts.fp8 and not ok:
        raise S2DError("model.fp8 needs Transformer Engine on a GPU (install the `gpu` extra) — or unset model.fp8")
    return ok


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(arch: ArchSpec, opts: ModelOptions, tp: int, pp: int):
    """Map the architecture onto megatron-core's ``TransformerConfig``."""
    from megatron.core.transformer import TransformerConfig

    if opts.dtype not in _DTYPES:
        raise S2DError(f"model.dtype = {opts.dtype!r}; expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[opts.dtype]
    cuda = torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim, normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_norm, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=opts.init_std,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=not cuda, perform_initialization=opts.initialize,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        deallocate_pipeline_outputs=False,
    )
    if opts.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if opts.fp8:
        kwargs.update(fp8="hybrid" if opts.fp8 == "delayed" else "e4m3",
                      fp8_recipe={"delayed": "delayed", "tensorwise": "tensorwise",
                                  "blockwise": "blockwise"}[opts.fp8])
    return TransformerConfig(**kwargs)


def layer_spec(arch: ArchSpec, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def build_gpt_model(arch: ArchSpec, opts: ModelOptions = ModelOptions(), pg_collection=None):
    """Build this rank's pipeline stage of the model, on this process's device.

    Model-parallel groups must exist (``runtime.dist.init_distributed``). With ``pg_collection`` (megatron-core 0.16
    ``ProcessGroupCollection``) the model uses those groups instead of the global ones: that is how a frozen teacher
    with its own TP layout lives next to the student in one job.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if pg_collection is not None:
        tp = pg_collection.tp.size()
        pp = pg_collection.pp.size()
        pp_rank = pg_collection.pp.rank()
    else:
        tp = ps.get_tensor_model_parallel_world_size()
        pp = ps.get_pipeline_model_parallel_world_size()
        pp_rank = ps.get_pipeline_model_parallel_rank()
    check_layout(arch, tp, pp)
    use_te = _resolve_te(opts)
    config = transformer_config(arch, opts, tp, pp)
    kwargs = {}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(arch, use_te), vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(arch.rope_theta), **kwargs,
    )
    model.s2d_uses_te = use_te  # packed sequences take THD cu_seqlens with TE, a block mask with the local spec
    # megatron-core's llama3 scaling hard-codes low/high freq factors and the original context length; set the
    # exact HF frequencies instead so any Llama-3.x config is reproduced to rounding.
    inv = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    model.rotary_pos_emb.inv_freq = inv.to(model.rotary_pos_emb.inv_freq.device)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
