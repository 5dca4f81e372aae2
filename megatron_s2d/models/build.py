"""Build a megatron-core ``GPTModel`` (one pipeline stage of it) from an :class:`ArchSpec`.

Llama-3.x and Qwen3 dense share one builder: they differ only in q/k RMSNorm (Qwen3), tied embeddings and RoPE
scaling, all carried by the ArchSpec. The Transformer Engine layer spec is used when TE imports and a GPU is present
(``use_te="auto"``); otherwise megatron-core's local spec (torch kernels), which is what runs on CPU.

With TE the GPU settings megatron users expect are on (:func:`config_kwargs`): the fused SwiGLU, TE's fused RoPE,
gradient-accumulation fusion where apex provides its kernel, and sequence parallelism at TP > 1. With ``fp8`` every
forward's token count must be a multiple of :func:`token_multiple` (the policy pads its micro-batches to it); the
megatron sampler generates without FP8 and without sequence parallelism (``rollout.megatron_sampler``).
"""

from __future__ import annotations

import math
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

# What the token count of every FP8 forward must be a multiple of. TE asserts that the flattened token dim of every
# FP8 GEMM input is a multiple of 8 (TE v2.11 pytorch/utils.py:439-447 ``assert_dim_for_fp8_exec``, called from
# module/linear.py:177, layernorm_linear.py:161, layernorm_mlp.py:333); megatron's GEMM input is (T, B, H) flattened
# to T*B, so T a multiple of 16 suffices. 16 is NeMo-RL's choice above TE's 8 (NeMo-RL 7ea279a
# nemo_rl/models/megatron/data.py:1298-1318; megatron-core 0.16.1 fp8_utils.py:168-173 ``get_fp8_align_size``), 128 for
# blockwise scaling, whose quantizer works on 128-token blocks (TE v2.11 tensor/float8_blockwise_tensor.py:216-223).
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 128}
# FP8 data format per recipe: HYBRID (E4M3 forward, E5M2 gradients) for delayed and current (tensorwise) scaling, as
# Megatron-LM and TE default (TE v2.11 common/recipe/__init__.py: DelayedScaling and Float8CurrentScaling default to
# HYBRID); E4M3 throughout for blockwise (Float8BlockScaling's default, and NeMo-RL's ``fp8: e4m3, blockwise``).
FP8_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3"}


def token_multiple(fp8: str | None, tp: int, sequence_parallel: bool) -> int:
    """What the token count (T of a (B, T) micro-batch, or S of a packed row) of every forward must be a multiple
    of: the FP8 recipe's GEMM rule, and the TP size with sequence parallelism (megatron splits T over the TP ranks)."""
    if fp8 is not None and fp8 not in FP8_TOKEN_MULTIPLE:
        raise S2DError(f"model.fp8 = {fp8!r}; expected one of {sorted(FP8_TOKEN_MULTIPLE)} or null")
    m = FP8_TOKEN_MULTIPLE[fp8] if fp8 else 1
    return math.lcm(m, tp) if sequence_parallel else m


def _grad_accum_fusion_available() -> bool:
    """megatron's fused wgrad accumulation needs apex's ``fused_weight_gradient_mlp_cuda`` for the (non-TE) output
    layer: ColumnParallelLinear raises at construction without it (megatron-core 0.16.1
    tensor_parallel/layers.py:44-48, 924-933). TE's linears fuse it natively (``fuse_wgrad_accumulation``)."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def config_kwargs(arch: ArchSpec, opts: ModelOptions, tp: int, pp: int, use_te: bool) -> dict:
    """The ``TransformerConfig`` arguments (a pure function: the GPU choices are testable on CPU)."""
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
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        deallocate_pipeline_outputs=False,
        # Fusions: off for the local spec (CPU, torch kernels); on with TE, as in Megatron-LM's defaults and the H100
        # baseline (shared/gpu/baseline_bench.py: 573 TFLOP/s with the fused SwiGLU and TE's fused RoPE, which also
        # handles THD natively where the unfused THD RoPE loops over the sequences in Python).
        bias_activation_fusion=use_te, apply_rope_fusion=use_te,
        gradient_accumulation_fusion=use_te and _grad_accum_fusion_available(),
        # Sequence parallelism with TE at TP > 1: the norms, dropout and residual activations are split over the TP
        # ranks instead of replicated (what models/memory.py's activation term assumes). The local spec cannot run it
        # (megatron-core 0.16.1 transformer/torch_norm.py:32 asserts), so CPU runs stay without it. The megatron
        # sampler turns it off around generation (one-token decode steps cannot be split along the sequence).
        sequence_parallel=use_te and tp > 1,
    )
    if opts.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if opts.fp8:
        if opts.fp8 not in FP8_FORMAT:
            raise S2DError(f"model.fp8 = {opts.fp8!r}; expected one of {sorted(FP8_FORMAT)} or null")
        kwargs.update(fp8=FP8_FORMAT[opts.fp8], fp8_recipe=opts.fp8)
        if opts.fp8 == "delayed":
            kwargs.update(
                # Delayed scaling all-reduces the amaxes over fp8_group at every autocast exit and in backward (TE
                # v2.11 quantization.py:497-521, ``DelayedScaling.reduce_amax`` defaults to True). megatron takes that
                # group from parallel_state: TP x DP x CP unless tp_only_amax_red (megatron-core 0.16.1
                # fp8_utils.py:621-625, parallel_state.py:1509-1532). Data-parallel ranks run different numbers of
                # micro-batches (each plans its own rows), and a scorer replica with an empty piece skips its
                # forward, so a TP x DP reduction would mismatch and hang; the ranks of one TP group always move
                # together. (Tensorwise and blockwise keep no amax history and reduce nothing across DP.)
                tp_only_amax_red=True,
                # TE's own DelayedScaling defaults (recipe/__init__.py: amax_history_len 1024, algo "max"), also what
                # the H100 baseline measured; megatron's defaults (1, "most_recent") scale by the last step's amax
                # alone, which overflows as soon as activations grow between steps.
                fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
            )
    return kwargs


def transformer_config(arch: ArchSpec, opts: ModelOptions, tp: int, pp: int, use_te: bool = False):
    """Map the architecture onto megatron-core's ``TransformerConfig`` (``use_te``: the TE layer spec's settings)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**config_kwargs(arch, opts, tp, pp, use_te))


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
    if opts.fp8 == "delayed" and pg_collection is not None:
        # the amax group of delayed scaling comes from parallel_state, i.e. the job's layout, not this model's
        # (megatron-core 0.16.1 fp8_utils.py:621-625 takes no pg_collection): it would pair ranks of different replicas
        raise S2DError("model.fp8 = 'delayed' for a model at a layout of its own (a frozen teacher whose tp/pp differ "
                       "from the stage's): delayed scaling reduces amaxes over the job's layout, not the model's; "
                       "use fp8: tensorwise or blockwise for this model")
    use_te = _resolve_te(opts)
    config = transformer_config(arch, opts, tp, pp, use_te)
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
    model.s2d_token_multiple = token_multiple(opts.fp8, tp, config.sequence_parallel)  # every forward's T pads to it
    # megatron-core's llama3 scaling hard-codes low/high freq factors and the original context length; set the
    # exact HF frequencies instead so any Llama-3.x config is reproduced to rounding.
    inv = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    model.rotary_pos_emb.inv_freq = inv.to(model.rotary_pos_emb.inv_freq.device)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
