"""Per-GPU memory of one stage job, in its two phases, from the models' HF configs alone (no GPU, no build); a
separate stage (``rollout.placement: separate``) has two sides, each estimated on its own (see the end).

The dry run prints it (``launch.checks``: columns ``train_peak`` / ``gen_peak`` against ``launch.gpu_memory_gib``)
and refuses a job that does not fit; the stage job calls :func:`vllm_memory_fraction` for vLLM's share when
``rollout.vllm.gpu_memory_utilization`` is unset. All figures are bytes on the *most loaded* GPU of the job (the
heaviest pipeline stage); ``GiB = 2**30`` bytes. Every term is counted only where the job turns its feature on.

Resident in both phases (``resident``):
  * **weights**   the trained policy: ceil(L/pp) layers + the embedding and/or output layer that pipeline stage holds,
    / TP; 2 bytes (bf16) or 4 (fp32) per parameter.
  * **frozen**    weights that only score: the teacher at its own tp/pp for ``fkl_warmup`` / ``opd``; for GRPO stages
    with ``grpo.kl_beta > 0`` the reference policy (the policy's base weights at the policy layout).
  * **fp8**       Transformer Engine's cached FP8 weights of every model with ``fp8`` set: the FP8 copy (1 B/param)
    and its transpose for the backward GEMMs (1 B), :data:`FP8_CACHE_BYTES` = 2 per parameter (F11 of the GPU review;
    a forward-only scorer may need only the first byte: counted as 2 here, an upper bound). TE keeps the cache between
    steps (``is_first_microbatch`` refreshes it in place), so nothing frees it around generation.
  * **overhead**  :data:`CUDA_CONTEXT_NCCL_GIB`: one CUDA context per process (shared by megatron and the colocated
    vLLM worker), the NCCL communicators' buffers of megatron's groups and vLLM's TP group, and what vLLM keeps
    outside its sleep pool while asleep (see the constant).

Training phase (``train_peak``: resident + these; vLLM sleeps at level 2: its weights and KV cache are discarded,
its runtime and CUDA-graph pools moved to the host: vllm/device_allocator/sleep_mode_backend.py:127-137):
  * **grads**     megatron's contiguous grad buffer in fp32 (``grad_reduce_in_fp32=True`` in policy/trainer.py):
    4 bytes/param.
  * **optim**     Adam: fp32 master copy (only when the weights are bf16) + exp_avg + exp_avg_sq = 12 (bf16) or 8
    (fp32) bytes/param, / DP when the distributed optimizer is on (it shards the optimizer state over DP).
  * **activations** per token per layer (Korthikanti et al. 2022, terms recounted for GQA + SwiGLU, flash attention:
    no score matrix): ``4h`` (the two norm inputs, the QKV and fc1 inputs) + ``2q + 2kv`` (q, k, v, attention
    output) + ``3f`` (gate and up outputs, SwiGLU output), plus ``q + kv`` for Qwen3's q/k-norm. The ``4h`` elements
    lie outside the tensor-parallel regions: they are divided by TP only under sequence parallelism, which megatron
    runs for training where TP > 1 and Transformer Engine is used (:func:`sequence_parallel`; the dry run assumes a
    GPU with TE, where ``use_te: auto`` resolves to yes); without it every TP rank holds them whole. The rest is
    split by TP. 1F1B: the first pipeline stage holds ``pp`` micro-batches of its ``L/pp`` layers, the last one
    micro-batch plus the vocab-parallel logits (:data:`LOGIT_BYTES` per token per vocab entry / TP). Full recompute
    keeps each layer's input (``h`` elements, / TP only under sequence parallelism) plus one layer's activations
    during its backward. Teacher / reference scoring (forward only: one layer at a time, counted without sequence
    parallelism, plus the logits) runs between generation and training, so this term is the max of the two.

Generation phase (``gen_peak``): the rollouts and the final evaluation. Both run after the colocated memory plan
(``rollout.colocation``) moved the grad buffers (megatron-core 0.16.1 ``DistributedDataParallel.offload_grad_buffers``,
distributed/distributed_data_parallel.py:575-594) and the optimizer state, master weights included
(``MegatronOptimizer.offload_to_cpu``, optimizer/optimizer.py:344-362) to the host and emptied the allocator cache:
resident + the engine's share (``rollout.engine: auto`` is counted as vLLM, which the job uses wherever it is
installed, as on the GPU nodes):
  * vLLM holds ``gpu_memory_utilization x total`` while awake, whatever it needs inside it: vLLM 0.32 reserves
    ``requested = ceil(total x util)`` at start-up (vllm/v1/worker/utils.py:724-726, the total being
    ``cudaMemGetInfo``'s) and refuses to start with less free (utils.py:761-770), then sizes its KV cache as
    ``requested - non_kv`` (vllm/v1/worker/gpu_worker.py:740-744; non_kv = its weights + the profiled forward and
    sampler peak). Inside the share this model checks that vLLM's weights (every layer, / ``rollout.vllm.tp``),
    its working memory (:func:`vllm_working_bytes`) and the KV cache of one longest sequence
    (``max_model_len = data.max_prompt_tokens + rollout.max_new_tokens``, which vLLM also checks at start-up)
    fit, CUDA graphs included unless ``rollout.vllm.enforce_eager``. Unset, the share is derived:
    ``budget - resident - HEADROOM_GIB`` (:func:`vllm_memory_fraction`).
  * the megatron sampler works in the trainer's pool on the trainer's weights (:class:`SamplerMemory`): its static
    KV cache at the generating model's tp/pp (``rollout.max_batch_tokens`` token slots, at least one
    ``max_model_len`` row, which runs alone; ``auto``: :data:`SAMPLER_KV_FRACTION` of the memory free then) + one
    prefill forward of :data:`SAMPLER_PREFILL_TOKENS` + the gathered decode logits of the chunk's rows.
  * the final evaluation (``stage.eval``: the megatron sampler on the trained policy, ``eval.max_new_tokens``, the
    stage's ``rollout.max_batch_tokens``) and ``base_eval`` (each base model alone, ``max_batch_tokens: auto``).

Separate placement (:func:`estimate_separate_memory`): the trainers hold what a colocated job holds while it
trains (the trained policy, a scoring teacher or the reference, grads, optimizer state sharded over *their*
data-parallel ranks, activations) and the final evaluation's sampler, but no rollout engine; the forward-KL
warmup's teacher, which only generates, lives on the generation ranks. A generation rank holds the engine alone
(:func:`estimate_generation_memory`).

Known approximations: norms and q/k-norm weights are counted as if TP-sharded (they are replicated; < 0.1 %), the
pipeline split assumes megatron's even layer split, micro-batches are assumed full (``micro_batch_tokens``), and
activations saved in FP8 are counted in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_s2d.config.schema import GRPOStageConfig, ModelConfig, PlanConfig, StageBase
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec

GIB = 2**30
# One CUDA context per process (~0.5 GiB with cuBLAS / cuDNN / TE kernels loaded), NCCL communicator buffers (each
# communicator a rank uses allocates NCCL_BUFFSIZE = 4 MiB per channel and direction and per peer of its ring/tree, up
# to 32 channels on NVLink: ~0.25 GiB per communicator; megatron's TP, DP, PP, embedding groups and vLLM's TP group
# are ~5 of them) and vLLM's persistent buffers outside its sleep pool (input ids / positions for
# max_num_batched_tokens, block tables, sampler state: < 0.3 GiB). Our reasoning, not a measurement: the GPU
# first-contact script's memory rehearsal is where it gets measured.
CUDA_CONTEXT_NCCL_GIB = 3.0
# Kept free below the budget when vLLM's share is derived: refit temporaries (one tensor or one layer's slices at a
# time: < 0.5 GiB at 70B), allocator segments that a live tensor keeps after empty_cache (PyTorch frees only wholly
# unused segments, up to the size of the largest activation block) and vLLM's own profiling slack (150 MiB,
# gpu_worker.py:994).
HEADROOM_GIB = 4.0
LOGIT_BYTES = 10  # bf16 logits (2) + fp32 copy (4) + fp32 softmax kept for backward (4), per token per vocab entry
FP8_CACHE_BYTES = 2  # TE's FP8 weight copy + its transpose, per parameter (see the module docstring)
# the megatron sampler (rollout/megatron_sampler.py; models/ sits below rollout/, so the values are repeated here and
# a test checks they agree): "auto" takes this share of the free memory for its KV cache, the rest is for the prefill
# activations, logits and sampling temporaries (KV_MEMORY_FRACTION); prompt tokens per prefill forward (the
# ``prefill_chunk_tokens`` default)
SAMPLER_KV_FRACTION = 0.85
SAMPLER_PREFILL_TOKENS = 16384
# vLLM 0.32's defaults for the offline LLM class on H100 / H200-class GPUs (vllm/engine/arg_utils.py:2933-2942): its
# profile run (part of non_kv) runs a forward of max_num_batched_tokens and the sampler on max_num_seqs rows
VLLM_MAX_BATCHED_TOKENS = 16384
VLLM_MAX_SEQS = 1024
# vLLM's sampler per row per vocab entry at its profiling peak: logits (bf16 2 + fp32 4), probabilities (4), the
# top-k/top-p sort (values 4 + int64 indices 8), its cumulative sum (4), raw log-probs (4): ~30, rounded up
VLLM_SAMPLER_BYTES = 32
# vLLM's CUDA graphs (``rollout.vllm.enforce_eager: false``), inside its share: vLLM 0.32 profiles their memory and
# takes it from the KV cache (gpu_worker.py:722-744, VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS on by default). The
# captured decode sizes share one pool holding a forward at the largest size (<= 512 tokens: < 0.1 GiB at these
# shapes) plus per-graph state; 1 GiB is our round upper figure, to be replaced by the first-contact measurement.
VLLM_CUDA_GRAPH_GIB = 1.0


def dtype_bytes(dtype: str) -> int:
    return {"bf16": 2, "fp32": 4}[dtype]


def sequence_parallel(m: ModelConfig) -> bool:
    """Whether ``m`` trains with sequence parallelism: megatron's TE path at TP > 1 (models/build.py); ``use_te: auto``
    is counted as TE (what it resolves to on a GPU node)."""
    return m.tp > 1 and m.use_te != "no"


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


def layer_elems_per_token(arch: ArchSpec, tp: int, sp: bool) -> float:
    """Saved activation elements per token per transformer layer on one GPU (see the module docstring): the ``4h``
    outside the tensor-parallel regions are split by TP only under sequence parallelism."""
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    split = 2 * q + 2 * kv + 3 * arch.intermediate_size + ((q + kv) if arch.qk_norm else 0)
    return 4 * arch.hidden_size / (tp if sp else 1) + split / tp


def training_activation_bytes(arch: ArchSpec, tp: int, pp: int, tokens: int, recompute: bool, act_bytes: int,
                              sp: bool) -> float:
    """Peak activation bytes of one GPU for a training micro-batch of ``tokens`` tokens (1F1B)."""
    full_layer = layer_elems_per_token(arch, tp, sp) * act_bytes * tokens
    saved_layer = arch.hidden_size / (tp if sp else 1) * act_bytes * tokens if recompute else full_layer
    recompute_extra = full_layer if recompute else 0.0
    logits = tokens * arch.vocab_size / tp * LOGIT_BYTES
    layers = math.ceil(arch.num_layers / pp)
    if pp == 1:
        return layers * saved_layer + recompute_extra + logits
    first = layers * pp * saved_layer + recompute_extra  # pp micro-batches in flight on the first stage
    last = layers * saved_layer + recompute_extra + logits
    return max(first, last)


def scoring_bytes(arch: ArchSpec, tp: int, tokens: int, act_bytes: int) -> float:
    """Forward-only working memory of a frozen scorer: one layer's activations (no sequence parallelism) plus the
    logits of a micro-batch."""
    return layer_elems_per_token(arch, tp, False) * act_bytes * tokens + tokens * arch.vocab_size / tp * LOGIT_BYTES


def kv_bytes_per_token(arch: ArchSpec, tp: int, pp: int, kv_bytes: int) -> float:
    """KV cache bytes per token on one GPU of an engine at (tp, pp); KV heads are replicated when TP > kv heads."""
    heads = max(1, arch.num_kv_heads // tp)
    return 2 * math.ceil(arch.num_layers / pp) * heads * arch.head_dim * kv_bytes


@dataclass(frozen=True)
class SamplerMemory:
    """The megatron sampler's memory in the trainer's pool, in GiB: its static KV cache (``slots`` token slots) and
    its working memory (one prefill forward of :data:`SAMPLER_PREFILL_TOKENS`: inference, one layer, no sequence
    parallelism, last-position logits only; the decode logits of the chunk's rows, gathered over TP)."""

    kv_gib: float
    working_gib: float
    slots: int  # KV token slots of one chunk
    seq_kv_gib: float  # the KV cache of one max_model_len row
    auto: bool  # rollout.max_batch_tokens: auto (the KV cache takes SAMPLER_KV_FRACTION of the free memory)

    @property
    def total_gib(self) -> float:
        return self.kv_gib + self.working_gib


def sampler_memory(arch: ArchSpec, m: ModelConfig, max_model_len: int, max_batch_tokens: int | str,
                   free_gib: float) -> SamplerMemory:
    """The megatron sampler generating with model ``m`` (``free_gib``: what the GPU has free when it starts, for
    ``max_batch_tokens: auto``)."""
    wb = dtype_bytes(m.dtype)
    per_token = kv_bytes_per_token(arch, m.tp, m.pp, wb)
    if max_batch_tokens == "auto":
        slots = max(1, int(SAMPLER_KV_FRACTION * max(free_gib, 0.0) * GIB // per_token))
    else:
        slots = max(int(max_batch_tokens), max_model_len)  # a row longer than the budget runs alone
    rows = max(1, slots // max_model_len)
    working = (layer_elems_per_token(arch, m.tp, False) * wb * SAMPLER_PREFILL_TOKENS
               + rows * arch.vocab_size * LOGIT_BYTES)
    return SamplerMemory(kv_gib=per_token * slots / GIB, working_gib=working / GIB, slots=slots,
                         seq_kv_gib=per_token * max_model_len / GIB, auto=max_batch_tokens == "auto")


def vllm_weight_bytes(arch: ArchSpec, vllm_tp: int, wb: int) -> float:
    """vLLM's own copy of the generating model: every layer (vLLM has no pipeline stages here), / its tp."""
    return params_on_heaviest_stage(arch, vllm_tp, 1) * wb


def vllm_working_bytes(arch: ArchSpec, vllm_tp: int, wb: int, cuda_graphs: bool) -> float:
    """vLLM's non-KV working memory at its profiling peak (part of ``non_kv``): one forward of
    :data:`VLLM_MAX_BATCHED_TOKENS` (one layer's intermediates, no sequence parallelism), the sampler on
    :data:`VLLM_MAX_SEQS` rows over the whole vocabulary, and its CUDA graphs when it captures them."""
    return (layer_elems_per_token(arch, vllm_tp, False) * wb * VLLM_MAX_BATCHED_TOKENS
            + VLLM_MAX_SEQS * arch.vocab_size * VLLM_SAMPLER_BYTES + (VLLM_CUDA_GRAPH_GIB * GIB if cuda_graphs else 0))


@dataclass(frozen=True)
class VLLMShare:
    """vLLM's share of one GPU while awake: ``util x total`` (set in the plan, or derived), and what it must hold."""

    util: float  # the fraction vLLM is given (rollout.vllm.gpu_memory_utilization, set or derived)
    derived: bool  # True: derived from this estimate (the plan leaves it unset)
    share_gib: float  # util x total
    weights_gib: float  # vLLM's weight copy
    working_gib: float  # its profiled forward + sampler peak
    seq_kv_gib: float  # the KV cache of one max_model_len sequence
    max_model_len: int

    @property
    def kv_gib(self) -> float:
        """What is left for the KV cache inside the share."""
        return self.share_gib - self.weights_gib - self.working_gib


@dataclass(frozen=True)
class StageMemory:
    """Per-GPU memory of one job in GiB, by phase (see the module docstring); ``problems`` says what does not fit,
    naming the field to change (empty: the job fits)."""

    job: str
    budget_gib: float
    weights_gib: float  # resident: the trained policy (base_eval: the evaluated model)
    frozen_gib: float  # resident: teacher / reference weights
    fp8_gib: float  # resident: TE's FP8 weight caches
    overhead_gib: float  # resident: CUDA context + NCCL
    grads_gib: float  # training only (on the host while generating)
    optim_gib: float  # training only (on the host while generating)
    activations_gib: float  # training only: max(training micro-batch, teacher/reference scoring)
    vllm: VLLMShare | None = None  # rollouts on vLLM
    sampler: SamplerMemory | None = None  # rollouts on the megatron sampler (base_eval: its evaluation)
    eval_sampler: SamplerMemory | None = None  # the final evaluation (None: stage.eval is off)
    trains: bool = True  # False for base_eval (no training phase)
    train_problems: tuple[str, ...] = ()  # what does not fit while training
    gen_problems: tuple[str, ...] = ()  # what does not fit while generating

    @property
    def problems(self) -> tuple[str, ...]:
        return self.train_problems + self.gen_problems

    @property
    def resident_gib(self) -> float:
        return self.weights_gib + self.frozen_gib + self.fp8_gib + self.overhead_gib

    @property
    def train_peak_gib(self) -> float:
        if not self.trains:
            return 0.0
        return self.resident_gib + self.grads_gib + self.optim_gib + self.activations_gib

    @property
    def engine_gib(self) -> float:
        """The rollout engine's share: vLLM's ``util x total``, or the megatron sampler's KV cache + working memory
        (0 on the trainers of a separate stage: they run no engine)."""
        if self.vllm is not None:
            return self.vllm.share_gib
        return self.sampler.total_gib if self.sampler is not None else 0.0

    @property
    def gen_peak_gib(self) -> float:
        evaluation = self.eval_sampler.total_gib if self.eval_sampler is not None else 0.0
        return self.resident_gib + max(self.engine_gib, evaluation)

    @property
    def fits(self) -> bool:
        return not self.problems

    def describe_resident(self) -> str:
        return (f"weights {self.weights_gib:.1f} + teacher/ref {self.frozen_gib:.1f} + fp8 caches {self.fp8_gib:.1f} "
                f"+ CUDA context/NCCL {self.overhead_gib:.1f}")

    def describe_train(self) -> str:
        return (f"{self.describe_resident()} + grads {self.grads_gib:.1f} + optimizer {self.optim_gib:.1f} + "
                f"activations {self.activations_gib:.1f} = {self.train_peak_gib:.1f} GiB")


def _world(plan: PlanConfig) -> int:
    return plan.launch.nodes * plan.launch.procs_per_node


def _dp(plan: PlanConfig, m: ModelConfig, ranks: int | None = None) -> int:
    """Data-parallel replicas of ``m`` over ``ranks`` (default: the job's world)."""
    return max(1, (_world(plan) if ranks is None else ranks) // (m.tp * m.pp))


def max_model_len(plan: PlanConfig, max_new_tokens: int) -> int:
    """The context an engine needs: the longest prompt the data allows plus the response."""
    return plan.data.max_prompt_tokens + max_new_tokens


def _resident(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
              separate: bool = False) -> tuple[float, float, float]:
    """(policy weights, frozen weights, FP8 caches) in bytes on one GPU of ``stage``'s job (``separate``: on one of
    its trainers, where a teacher that only generates, the forward-KL warmup's, is not held)."""
    m, arch = plan.models[stage.trains], archs[stage.trains]
    p = params_on_heaviest_stage(arch, m.tp, m.pp)
    frozen, fp8 = 0.0, p * FP8_CACHE_BYTES if m.fp8 else 0.0
    if stage.teachers() and not (separate and stage.samples_from == "teacher"):
        t = plan.models["teacher"]
        pt = params_on_heaviest_stage(archs["teacher"], t.tp, t.pp)
        frozen = pt * dtype_bytes(t.dtype)
        fp8 += pt * FP8_CACHE_BYTES if t.fp8 else 0.0
    elif isinstance(stage, GRPOStageConfig) and stage.grpo.kl_beta > 0:
        frozen = p * dtype_bytes(m.dtype)  # the reference policy, built like the policy
        fp8 += p * FP8_CACHE_BYTES if m.fp8 else 0.0
    return p * dtype_bytes(m.dtype), frozen, fp8


def _vllm_share(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], resident_gib: float,
                total_gib: float) -> VLLMShare:
    role = stage.samples_from
    m, arch = plan.models[role], archs[role]
    wb, vtp = dtype_bytes(m.dtype), stage.rollout.vllm.tp or m.tp
    mml = max_model_len(plan, stage.rollout.max_new_tokens)
    set_util = stage.rollout.vllm.gpu_memory_utilization
    if set_util is None:
        util = (min(plan.launch.gpu_memory_gib, total_gib) - resident_gib - HEADROOM_GIB) / total_gib
    else:
        util = set_util
    return VLLMShare(util=util, derived=set_util is None, share_gib=util * total_gib,
                     weights_gib=vllm_weight_bytes(arch, vtp, wb) / GIB,
                     working_gib=vllm_working_bytes(arch, vtp, wb, not stage.rollout.vllm.enforce_eager) / GIB,
                     seq_kv_gib=kv_bytes_per_token(arch, vtp, 1, wb) * mml / GIB, max_model_len=mml)


def _vllm_problems(stage: StageBase, est: StageMemory, v: VLLMShare, total_gib: float) -> list[str]:
    key = f"stages.{stage.name}.rollout.vllm.gpu_memory_utilization"
    budget = min(est.budget_gib, total_gib)
    peak = est.resident_gib + v.share_gib
    if not v.derived and peak > budget:
        most = (budget - est.resident_gib) / total_gib
        return [f"{key} = {v.util:g}: vLLM takes {v.util:g} x {total_gib:g} = {v.share_gib:.1f} GiB per GPU while "
                f"awake, on top of the {est.resident_gib:.1f} GiB that stay resident during generation "
                f"({est.describe_resident()}): {peak:.1f} GiB > launch.gpu_memory_gib = {est.budget_gib:g}; at most "
                f"{max(most, 0):.2f} fits: lower it, or leave it unset to derive it from this estimate"]
    if v.kv_gib < v.seq_kv_gib:
        what = (f"{key} derived as {v.util:.2f} (launch.gpu_memory_gib {budget:g} - {est.resident_gib:.1f} resident "
                f"({est.describe_resident()}) - {HEADROOM_GIB:g} headroom = {v.share_gib:.1f} GiB)" if v.derived
                else f"{key} = {v.util:g} ({v.share_gib:.1f} GiB)")
        need = (v.weights_gib + v.working_gib + v.seq_kv_gib) / total_gib
        return [f"{what} cannot hold vLLM's weights {v.weights_gib:.1f} + working memory {v.working_gib:.1f} + the "
                f"KV cache of one {v.max_model_len}-token sequence (data.max_prompt_tokens + "
                f"stages.{stage.name}.rollout.max_new_tokens) {v.seq_kv_gib:.2f} GiB (needs >= {need:.2f}); raise "
                f"rollout.vllm.tp, shorten the sequences, or move resident memory off this GPU (tp/pp, nodes)"]
    return []


def _sampler_problems(est: StageMemory, smp: SamplerMemory, what: str, mbt_key: str, lengths: str) -> list[str]:
    """What a megatron-sampler generation (``what``: "stages.x: rollouts on the megatron sampler need") cannot fit;
    ``lengths``: the fields that set its sequence length."""
    peak = est.resident_gib + smp.total_gib
    setting = f"{mbt_key} = {'auto' if smp.auto else smp.slots}"
    if smp.kv_gib < smp.seq_kv_gib:  # auto: not even one row's KV cache in the free memory
        return [f"{what} the KV cache of one sequence ({smp.seq_kv_gib:.2f} GiB), but {setting} finds room for only "
                f"{smp.kv_gib:.2f} GiB next to {est.describe_resident()}; shorten {lengths}, or move resident "
                f"memory off this GPU (tp/pp, nodes)"]
    if peak > est.budget_gib:
        return [f"{what} {est.describe_resident()} + the sampler's KV cache {smp.kv_gib:.1f} ({setting}) + working "
                f"memory {smp.working_gib:.1f} = {peak:.1f} GiB per GPU > launch.gpu_memory_gib = {est.budget_gib:g}; "
                f"lower {mbt_key} (auto: sized from the free memory) or shorten {lengths}"]
    return []


def estimate_stage_memory(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
                          total_gib: float | None = None, train_ranks: int | None = None) -> StageMemory:
    """The memory of ``stage``'s job on one GPU, by phase, and what does not fit. ``total_gib``: the GPU's total
    memory as CUDA reports it (vLLM's share is a fraction of it); default ``launch.gpu_memory_gib``.
    ``train_ranks``: None for a colocated job (every rank trains and generates); else the trainers of a separate
    one (see :func:`estimate_separate_memory`): its data-parallel size is theirs and they run no rollout engine."""
    total = plan.launch.gpu_memory_gib if total_gib is None else total_gib
    separate = train_ranks is not None
    role = stage.trains
    m, arch = plan.models[role], archs[role]
    wb = dtype_bytes(m.dtype)
    p = params_on_heaviest_stage(arch, m.tp, m.pp)
    weights, frozen, fp8 = _resident(plan, stage, archs, separate)
    dp = _dp(plan, m, train_ranks)
    optim_per_param = (12 if m.dtype == "bf16" else 8) / (dp if stage.optim.use_distributed_optimizer else 1)
    tokens = stage.micro_batch_tokens
    act = training_activation_bytes(arch, m.tp, m.pp, tokens, m.recompute, wb, sequence_parallel(m))
    if stage.teachers() and not (separate and stage.samples_from == "teacher"):
        t = plan.models["teacher"]
        act = max(act, scoring_bytes(archs["teacher"], t.tp, tokens, dtype_bytes(t.dtype)))
    elif isinstance(stage, GRPOStageConfig) and stage.grpo.kl_beta > 0:
        act = max(act, scoring_bytes(arch, m.tp, tokens, wb))
    resident_gib = (weights + frozen + fp8) / GIB + CUDA_CONTEXT_NCCL_GIB
    free_gib = min(plan.launch.gpu_memory_gib, total) - resident_gib  # while generating: grads, optimizer on the host
    mbt = stage.rollout.max_batch_tokens
    vllm = sampler = evaluation = None
    # "auto" is modelled as vLLM: the job uses it wherever it is installed, as on the GPU nodes. A separate stage's
    # trainers hold no engine: its generation ranks do (estimate_generation_memory)
    if not separate and stage.rollout.engine == "megatron":
        gen = stage.samples_from
        sampler = sampler_memory(archs[gen], plan.models[gen], max_model_len(plan, stage.rollout.max_new_tokens), mbt,
                                 free_gib)
    elif not separate:
        vllm = _vllm_share(plan, stage, archs, resident_gib, total)
    if stage.eval:
        evaluation = sampler_memory(arch, m, max_model_len(plan, plan.eval.max_new_tokens), mbt, free_gib)
    est = StageMemory(job=stage.name, budget_gib=plan.launch.gpu_memory_gib, weights_gib=weights / GIB,
                      frozen_gib=frozen / GIB, fp8_gib=fp8 / GIB, overhead_gib=CUDA_CONTEXT_NCCL_GIB,
                      grads_gib=p * 4 / GIB, optim_gib=p * optim_per_param / GIB, activations_gib=act / GIB,
                      vllm=vllm, sampler=sampler, eval_sampler=evaluation)
    return _with_problems(stage, est, total)


def _with_problems(stage: StageBase, est: StageMemory, total: float) -> StageMemory:
    role, w = stage.trains, f"stages.{stage.name}"
    mbt, train, out = f"{w}.rollout.max_batch_tokens", [], []
    if est.trains and est.train_peak_gib > est.budget_gib:
        train.append(f"{w}: the training phase needs {est.describe_train()} per GPU > launch.gpu_memory_gib = "
                   f"{est.budget_gib:g}; lower {w}.micro_batch_tokens, enable models.{role}.recompute, raise "
                   f"models.{role}.tp / pp, or add nodes (more data-parallel ranks shard the optimizer)")
    if est.vllm is not None:
        out.extend(_vllm_problems(stage, est, est.vllm, total))
    elif est.sampler is not None:
        where = "the generation ranks' rollouts" if not est.trains else "rollouts"
        out.extend(_sampler_problems(est, est.sampler, f"{w}: {where} on the megatron sampler need", mbt,
                                     f"data.max_prompt_tokens / {w}.rollout.max_new_tokens"))
    if est.eval_sampler is not None:
        out.extend(_sampler_problems(est, est.eval_sampler, f"{w}: the final evaluation needs", mbt,
                                     f"data.max_prompt_tokens / eval.max_new_tokens (or set {w}.eval: false)"))
    return StageMemory(**{**est.__dict__, "train_problems": tuple(train), "gen_problems": tuple(out)})


def generation_layout(plan: PlanConfig, stage: StageBase) -> tuple[int, int]:
    """(tp, pp) of one replica of a stage's rollout engine: vLLM at ``rollout.vllm.tp`` (default the generating
    model's tp) with every layer on each rank, or the megatron sampler at the generating model's own tp / pp."""
    m = plan.models[stage.samples_from]
    return (m.tp, m.pp) if stage.rollout.engine == "megatron" else (stage.rollout.vllm.tp or m.tp, 1)


def estimate_generation_memory(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
                               total_gib: float | None = None) -> StageMemory:
    """One GPU of a separate stage's generation ranks: the rollout engine alone (no trainer, no optimizer, no final
    evaluation), and the megatron model the weight transfer writes into (``rollout.generation_side``), in the
    model's dtype (bf16 or fp32; without FP8). The megatron sampler runs on that model at its tp / pp, its KV cache
    in what is left (``max_batch_tokens: auto``); vLLM holds its share next to it at (``vllm.tp``, pp 1) (its own
    weights inside the share; unset, derived as budget - CUDA context - that model - headroom)."""
    total = plan.launch.gpu_memory_gib if total_gib is None else total_gib
    role = stage.samples_from
    m, arch = plan.models[role], archs[role]
    tp, pp = generation_layout(plan, stage)
    weights, vllm, sampler = params_on_heaviest_stage(arch, tp, pp) * dtype_bytes(m.dtype) / GIB, None, None
    if stage.rollout.engine == "megatron":
        free = min(plan.launch.gpu_memory_gib, total) - weights - CUDA_CONTEXT_NCCL_GIB
        sampler = sampler_memory(arch, m, max_model_len(plan, stage.rollout.max_new_tokens),
                                 stage.rollout.max_batch_tokens, free)
    else:
        vllm = _vllm_share(plan, stage, archs, CUDA_CONTEXT_NCCL_GIB + weights, total)
    est = StageMemory(job=stage.name, budget_gib=plan.launch.gpu_memory_gib, weights_gib=weights, frozen_gib=0.0,
                      fp8_gib=0.0, overhead_gib=CUDA_CONTEXT_NCCL_GIB, grads_gib=0.0, optim_gib=0.0,
                      activations_gib=0.0, vllm=vllm, sampler=sampler, trains=False)
    return _with_problems(stage, est, total)


def generation_vllm_fraction(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
                             total_gib: float | None = None) -> float:
    """The ``gpu_memory_utilization`` of a separate stage's vLLM on its generation ranks
    (:func:`estimate_generation_memory`; as :func:`vllm_memory_fraction` for a colocated one). Raises
    :class:`S2DError` naming the field when it cannot fit."""
    est = estimate_generation_memory(plan, stage, archs, total_gib)
    if est.gen_problems:
        raise S2DError("; ".join(est.gen_problems))
    return est.vllm.util


def estimate_separate_memory(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec], generation_ranks: int,
                             total_gib: float | None = None) -> tuple[StageMemory, StageMemory]:
    """(trainers, generation ranks) of ``stage`` placed separately, ``generation_ranks`` of the job's world
    generating: one GPU of each side (:func:`estimate_stage_memory` with ``train_ranks``,
    :func:`estimate_generation_memory`)."""
    train = estimate_stage_memory(plan, stage, archs, total_gib, train_ranks=_world(plan) - generation_ranks)
    return train, estimate_generation_memory(plan, stage, archs, total_gib)


def estimate_base_eval_memory(plan: PlanConfig, archs: dict[str, ArchSpec]) -> StageMemory:
    """``base_eval``: each base model's weights (+ FP8 caches) and the megatron sampler of the evaluation
    (``max_batch_tokens: auto``, as ``stages.entry`` builds it), one model at a time (the larger of the two); no
    training phase."""
    best = None
    for role, arch in archs.items():
        m = plan.models[role]
        p = params_on_heaviest_stage(arch, m.tp, m.pp)
        weights, fp8 = p * dtype_bytes(m.dtype) / GIB, p * FP8_CACHE_BYTES / GIB if m.fp8 else 0.0
        free = plan.launch.gpu_memory_gib - weights - fp8 - CUDA_CONTEXT_NCCL_GIB
        smp = sampler_memory(arch, m, max_model_len(plan, plan.eval.max_new_tokens), "auto", free)
        est = StageMemory(job="base_eval", budget_gib=plan.launch.gpu_memory_gib, weights_gib=weights, frozen_gib=0.0,
                          fp8_gib=fp8, overhead_gib=CUDA_CONTEXT_NCCL_GIB, grads_gib=0.0, optim_gib=0.0,
                          activations_gib=0.0, sampler=smp, trains=False)
        problems = _sampler_problems(est, smp, f"base_eval: evaluating models.{role} needs", "max_batch_tokens",
                                     "data.max_prompt_tokens / eval.max_new_tokens")
        est = StageMemory(**{**est.__dict__, "gen_problems": tuple(problems)})
        best = est if best is None or (bool(est.problems), est.gen_peak_gib) > (bool(best.problems),
                                                                               best.gen_peak_gib) else best
    return best


def vllm_memory_fraction(plan: PlanConfig, stage: StageBase, archs: dict[str, ArchSpec],
                         total_gib: float | None = None) -> float:
    """The ``gpu_memory_utilization`` to start ``stage``'s vLLM engine with: the plan's
    ``rollout.vllm.gpu_memory_utilization`` when set, else ``(budget - resident during generation - HEADROOM_GIB) /
    total``, with budget = min(``launch.gpu_memory_gib``, ``total_gib``). Raises :class:`S2DError` naming the field
    when that share cannot fit or cannot hold one longest sequence.

    ``archs``: the ArchSpec of each model the stage holds (``StageBase.models``). ``total_gib``: the GPU's
    total memory as CUDA reports it (``torch.cuda.mem_get_info()[1] / 2**30`` at run time: vLLM multiplies that by
    the fraction); default ``launch.gpu_memory_gib``. The residency assumed is the generation phase's: grad buffers
    and optimizer state on the host; vLLM's start-up check (free >= util x total, vllm/v1/worker/utils.py:761-770)
    needs the same state when the engine is built."""
    est = estimate_stage_memory(plan, stage, archs, total_gib)
    if est.vllm is None:
        raise S2DError(f"stages.{stage.name}.rollout.engine = {stage.rollout.engine!r}: the stage has no vLLM engine")
    total = plan.launch.gpu_memory_gib if total_gib is None else total_gib
    problems = _vllm_problems(stage, est, est.vllm, total)
    if problems:
        raise S2DError("; ".join(problems))
    return est.vllm.util
