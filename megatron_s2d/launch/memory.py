"""Per-GPU memory estimate of one stage, for the dry run (no GPU, no model build: arithmetic on the HF config).

The estimate is deliberately simple and documented term by term, so that an over-budget verdict can be read and
acted on. All figures are bytes on the *most loaded* GPU of the stage; ``GiB = 2**30`` bytes.

Persistent (resident for the whole job):
  * **weights**   trained policy, heaviest pipeline stage: ceil(L/pp) layers + the embedding and/or output layer that
    stage holds, divided by TP; 2 bytes (bf16) or 4 (fp32) per parameter. FP8 (TE) keeps bf16 weights and casts on
    the fly, so it does not change this term.
  * **grads**     megatron's contiguous grad buffer in fp32 (4 bytes/param; Megatron-LM's bf16 default of accumulating
    and reducing grads in fp32).
  * **optim**     Adam: fp32 master copy (only when the weights are bf16) + exp_avg + exp_avg_sq = 12 (bf16) or 8
    (fp32) bytes/param, divided by DP when the distributed optimizer is on (it shards optimizer state over DP).
  * **teacher**   frozen weights that score: the teacher at its own TP/PP for ``fkl_warmup`` / ``opd``; for RL stages
    with ``grpo.kl_beta > 0`` the reference policy (the policy's base weights at the policy layout).
  * **overhead**  CUDA context, NCCL buffers, allocator fragmentation: a flat :data:`OVERHEAD_GIB`.

Transient (one of these phases at a time, so the estimate adds their maximum):
  * **activations** (training phase) per token per layer, bf16, flash attention (no score matrix), SwiGLU, sequence
    parallel when TP > 1 (everything divided by TP), following Korthikanti et al. 2022 with the terms recounted for
    GQA + SwiGLU: ``4h`` (two norm inputs, QKV and fc1 inputs) ``+ 2q + 2kv`` (q, k, v and the attention output)
    ``+ 3f`` (gate and up outputs, SwiGLU output) elements, plus ``q + kv`` for Qwen3's q/k-norm. With 1F1B pipeline
    scheduling the first stage holds ``pp`` micro-batches of its ``L/pp`` layers (= ``L`` layers of one micro-batch);
    the last stage holds one micro-batch plus the vocab-parallel logits (bf16 logits + fp32 copy + fp32 softmax kept
    for backward: :data:`LOGIT_BYTES` bytes per token per vocab entry / TP). Full recompute keeps only each layer's
    input (``h`` elements) plus one layer's activations during its backward. Teacher scoring (forward only: one
    layer + the teacher's logits) happens between rollouts and training and is folded into this term as a max.
  * **rollout** (generation phase: stage rollouts and the final evaluation) vLLM holds its own bf16 copy of the
    generating model's weights, every layer split ``rollout.vllm.tp`` ways (its trainer copy stays resident; vLLM sleeps
    while the trainer scores and trains, so this and the activations never coexist) plus a KV cache sized for
    :data:`KV_RESERVE_SEQUENCES` full-length sequences (prompt :data:`PROMPT_TOKENS` + ``max_new_tokens``) per engine;
    the megatron sampler reuses the trainer weights and needs only the KV cache. Engines use the generating model's
    TP/PP. This is a *reserve*, not vLLM's appetite: vLLM takes whatever ``gpu_memory_utilization`` allows and runs
    more sequences concurrently when it can.

Known approximations: norms and q/k-norm weights are counted as if TP-sharded (they are replicated; < 0.1 %), the
pipeline split assumes megatron's even layer split, and micro-batches are assumed full (``micro_batch_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_s2d.config.kinds import kind_of
from megatron_s2d.config.schema import GRPOStageConfig, ModelConfig, PlanConfig, StageBase
from megatron_s2d.models.arch import ArchSpec

GIB = 2**30
OVERHEAD_GIB = 3.0  # CUDA context + NCCL buffers + fragmentation, per GPU
LOGIT_BYTES = 10  # bf16 logits (2) + fp32 copy (4) + fp32 softmax kept for backward (4), per token per vocab entry
KV_RESERVE_SEQUENCES = 32  # full-length sequences the rollout engine must be able to hold at once (per engine)
PROMPT_TOKENS = 512  # prompt length assumed for the KV reserve (math prompts + chat template are shorter)
KV_BYTES = 2  # bf16 KV cache


def dtype_bytes(dtype: str) -> int:
    return {"bf16": 2, "fp32": 4}[dtype]


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU estimate of one stage, in GiB. ``total_gib = persistent + max(activations, rollout)``."""

    stage: str
    weights_gib: float
    grads_gib: float
    optim_gib: float
    teacher_gib: float
    activations_gib: float
    rollout_gib: float
    overhead_gib: float
    budget_gib: float

    @property
    def persistent_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optim_gib + self.teacher_gib + self.overhead_gib

    @property
    def total_gib(self) -> float:
        return self.persistent_gib + max(self.activations_gib, self.rollout_gib)

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib

    def describe(self) -> str:
        return (f"weights {self.weights_gib:.1f} + grads {self.grads_gib:.1f} + optimizer {self.optim_gib:.1f} + "
                f"teacher/ref {self.teacher_gib:.1f} + overhead {self.overhead_gib:.1f} + max(activations "
                f"{self.activations_gib:.1f}, rollout {self.rollout_gib:.1f}) = {self.total_gib:.1f} GiB per GPU "
                f"(budget launch.gpu_memory_gib = {self.budget_gib:.1f})")


def params_on_heaviest_stage(arch: ArchSpec, tp: int, pp: int) -> float:
    """Parameters held by one GPU of the heaviest pipeline stage (embedding / output layer included), / TP."""
    h = arch.hidden_size
    per_layer = (arch.num_params - arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) - h) / arch.num_layers
    layers = math.ceil(arch.num_layers / pp)
    emb = arch.vocab_size * h
    if pp == 1:
        edge = emb * (1 if arch.tie_word_embeddings else 2) + h
    else:  # first stage holds the input embedding, last the output layer (a copy of it when tied) + final norm
        edge = emb + h
    return (layers * per_layer + edge) / tp


def activation_elems_per_token_layer(arch: ArchSpec) -> int:
    """Saved activation elements per token per transformer layer (see the module docstring)."""
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    elems = 4 * arch.hidden_size + 2 * q + 2 * kv + 3 * arch.intermediate_size
    if arch.qk_norm:
        elems += q + kv
    return elems


def training_activation_bytes(arch: ArchSpec, tp: int, pp: int, tokens: int, recompute: bool, act_bytes: int) -> float:
    """Peak activation bytes of one GPU for a training micro-batch of ``tokens`` tokens (1F1B, sequence parallel)."""
    full_layer = activation_elems_per_token_layer(arch) * act_bytes * tokens / tp
    saved_layer = arch.hidden_size * act_bytes * tokens / tp if recompute else full_layer
    recompute_extra = full_layer if recompute else 0.0
    logits = tokens * arch.vocab_size / tp * LOGIT_BYTES
    layers = math.ceil(arch.num_layers / pp)
    if pp == 1:
        return layers * saved_layer + recompute_extra + logits
    first = layers * pp * saved_layer + recompute_extra  # pp micro-batches in flight on the first stage
    last = layers * saved_layer + recompute_extra + logits
    return max(first, last)


def scoring_bytes(arch: ArchSpec, tp: int, tokens: int, act_bytes: int) -> float:
    """Forward-only working memory of a frozen scorer: one layer's activations plus the logits of a micro-batch."""
    layer = activation_elems_per_token_layer(arch) * act_bytes * tokens / tp
    return layer + tokens * arch.vocab_size / tp * LOGIT_BYTES


def kv_bytes_per_token(arch: ArchSpec, tp: int, pp: int) -> float:
    """KV cache bytes per token on one GPU of an engine at (tp, pp); KV heads are replicated when TP > kv heads."""
    heads = max(1, arch.num_kv_heads // tp)
    return 2 * math.ceil(arch.num_layers / pp) * heads * arch.head_dim * KV_BYTES


def engine_bytes(arch: ArchSpec, model: ModelConfig, engine: str, max_new_tokens: int, vllm_tp: int = 0) -> float:
    """Rollout reserve of one engine generating with ``model`` on one GPU: the megatron sampler only needs its KV
    cache (it runs on the trainer's weights, at the model's tp/pp); vLLM (``auto`` counts as vLLM: the job uses it
    where installed) holds its own bf16 copy of *all* layers split ``vllm_tp`` ways plus a KV cache for all layers."""
    tokens = KV_RESERVE_SEQUENCES * (PROMPT_TOKENS + max_new_tokens)
    if engine == "megatron":
        return kv_bytes_per_token(arch, model.tp, model.pp) * tokens
    tp = vllm_tp or model.tp
    return params_on_heaviest_stage(arch, tp, 1) * 2 + kv_bytes_per_token(arch, tp, 1) * tokens


def estimate_stage_memory(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], dp: int) -> MemoryEstimate:
    """Estimate the per-GPU memory of ``stage`` (policy at its layout with data-parallel size ``dp``)."""
    kind = kind_of(stage)
    role = kind.trains
    m, arch = plan.models[role], archs[role]
    wb = dtype_bytes(m.dtype)
    p = params_on_heaviest_stage(arch, m.tp, m.pp)
    optim_per_param = (12 if m.dtype == "bf16" else 8) / (dp if stage.optim.use_distributed_optimizer else 1)
    tokens = stage.micro_batch_tokens
    act = training_activation_bytes(arch, m.tp, m.pp, tokens, m.recompute, wb)
    teacher = 0.0
    if kind.needs_teacher:
        t, tarch = plan.models["teacher"], archs["teacher"]
        teacher = params_on_heaviest_stage(tarch, t.tp, t.pp) * dtype_bytes(t.dtype)
        act = max(act, scoring_bytes(tarch, t.tp, tokens, dtype_bytes(t.dtype)))
    elif isinstance(stage, GRPOStageConfig) and stage.grpo.kl_beta > 0:
        teacher = p * wb  # frozen reference policy at the policy's layout
        act = max(act, scoring_bytes(arch, m.tp, tokens, wb))
    gen_role = kind.samples_from
    rollout = engine_bytes(archs[gen_role], plan.models[gen_role], stage.rollout.engine, stage.rollout.max_new_tokens,
                           stage.rollout.vllm.tp or 0)
    if stage.eval:
        rollout = max(rollout, engine_bytes(arch, m, plan.eval.engine, plan.eval.max_new_tokens))
    return MemoryEstimate(
        stage=stage.name, weights_gib=p * wb / GIB, grads_gib=p * 4 / GIB, optim_gib=p * optim_per_param / GIB,
        teacher_gib=teacher / GIB, activations_gib=act / GIB, rollout_gib=rollout / GIB, overhead_gib=OVERHEAD_GIB,
        budget_gib=plan.launch.gpu_memory_gib)
