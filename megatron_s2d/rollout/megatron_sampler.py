"""KV-cached sampling on the live megatron-core policy (TP >= 1, PP >= 1): the rollout engine that needs nothing extra.

    sampler = MegatronSampler(model, arch, eos_token_ids=[tok.eos_id])
    result = sampler.generate([[1, 5, 9], [1, 7]], SamplingParams(n=4, temperature=1.0, max_new_tokens=64, seed=step))
    result.samples[0][3].response_ids, result.samples[0][3].logprobs, result.metrics["tokens_per_s"]

How it works
- KV cache: megatron-core's own ``StaticInferenceContext`` passed as ``inference_context=`` to ``GPTModel.forward``
  (eval mode). The attention layers allocate one (max_seq, batch, kv_heads, head_dim) K and V buffer per layer and
  append to it at ``sequence_len_offset``; RoPE is taken at the absolute cache positions and only the last
  position's logits are materialised, gathered over the TP group (megatron requires that in inference).
- Variable-length prompts, no padding: the rows of a chunk are *right-aligned nowhere*: every row starts at cache
  position 0. The chunk is prefilled up to its shortest prompt, then each decode step feeds one token per row: the
  row's next prompt token while it is still inside its prompt (teacher forcing; the logits there are discarded), its
  sampled token afterwards. So every cached position holds a real token, attention needs no padding mask (causal in
  the prefill, everything in decode) and positions equal those of an unpadded forward, which is what the trainer
  computes; this is also how megatron's static engine handles ragged prompts. Rows are sorted by prompt length
  before chunking, which keeps the teacher-forced stretch short. We chose this over left padding because the
  static context applies RoPE by cache index (left padding would shift positions) and the TE attention path
  ignores padding masks in decode.
- The ``n`` samples of a prompt share one prefill: unique prompts are prefilled (in micro-batches of at most
  ``prefill_chunk_tokens`` tokens) and the cache is then expanded along the batch.
- Finished rows (stop token or ``max_new_tokens``) stop being sampled at once; they are compacted out of the batch
  and the KV cache when the live fraction falls below ``compact_ratio``.
- Memory: rows are split into chunks with rows * (longest prompt + max_new_tokens) <= ``max_batch_tokens`` (the KV
  cache is rectangular). A single row longer than the budget runs alone. ``max_batch_tokens="auto"`` sizes the budget
  at every ``generate`` from the memory free on the GPU then (``torch.cuda.mem_get_info`` plus the allocator's cached
  blocks) and the model's KV bytes per token at its layout (:func:`kv_bytes_per_token`), keeping
  ``1 - KV_MEMORY_FRACTION`` of it for the prefill activations, the (rows, V) logits and sampling temporaries; the
  model-parallel ranks take the smallest of their budgets (they must cut the same chunks). On CPU it is
  ``CPU_MAX_BATCH_TOKENS``.
- Host syncs: a decode step samples every live row (rows still inside their prompt or already finished discard the
  draw; the randomness is counter-based, so nothing changes for the rows that keep theirs) and writes with masks, so
  a step needs no ``nonzero``; finished rows are counted (and compacted away) every ``CHECK_EVERY`` steps, one host
  sync each (a finished row may ride along for up to ``CHECK_EVERY - 1`` steps, writing nothing).
- Precision and layout: generation runs without FP8 and without sequence parallelism, whatever the model trains with
  (both restored afterwards; see :func:`_generation_forward`).
- Randomness is counter-based (``token_sampling``): a sample depends only on (seed, prompt, prompt index, sample
  index), not on chunking, compaction or the TP layout. The same seed and prompts give the same samples, so vary
  ``SamplingParams.seed`` per call (e.g. base seed + step, and + data-parallel rank if ranks may see equal prompts).
- Tensor parallelism: every TP rank runs the same loop on the same gathered (B, V) last-position logits; the drawn
  tokens are broadcast from TP rank 0 anyway, so nondeterministic kernels can never make the ranks diverge. All TP
  ranks must call ``generate`` with the same prompts and params (checked with one small all-reduce).
- Log-probs (``Sample.logprobs``): log softmax(logits / temperature) of the drawn token, before top-k/top-p
  truncation, fp32, computed with ``policy.logprobs.token_logprobs`` (the trainer's function). With
  ``temperature == 0`` (greedy) they are the untempered (T = 1) log-probs. Stop tokens are kept in the response
  (finish_reason "stop"); the engine's ``eos_token_ids`` always stop, in addition to ``params.stop_token_ids``.
- Pipeline parallelism: each forward runs stage by stage (hidden states sent to the next stage, each stage keeping
  the KV cache of its own layers); the last stage's (b, V) logits are broadcast over the pipeline group, so every
  rank runs the same sampling loop and returns the same samples. All ranks of the model-parallel group must call
  ``generate`` together.
"""

from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.policy.logprobs import token_logprobs, topk_logprobs
from megatron_s2d.rollout.base import GenerationResult, Sample, SamplingParams, generation_metrics, validate_request
from megatron_s2d.rollout.token_sampling import prompt_key, row_keys, sample_tokens, uniforms

__all__ = ["MegatronSampler", "kv_bytes_per_token", "plan_chunks"]

CPU_MAX_BATCH_TOKENS = 65536  # the budget ``max_batch_tokens="auto"`` means on CPU (no free-memory query there)
KV_MEMORY_FRACTION = 0.85  # "auto": the share of the free GPU memory the KV cache may take (the rest: activations)
CHECK_EVERY = 8  # decode steps between counts of the finished rows (each count is a host sync)


def plan_chunks(sorted_lengths: Sequence[int], max_new_tokens: int, max_batch_tokens: int) -> list[range]:
    """Split rows (prompt lengths sorted ascending) into consecutive chunks whose KV cache fits the budget.

    A chunk of c rows whose longest prompt is L costs c * (L + max_new_tokens) cache slots; a row that alone exceeds
    ``max_batch_tokens`` gets a chunk of its own.
    """
    chunks, start = [], 0
    for i, length in enumerate(sorted_lengths):
        if i > start and (i - start + 1) * (length + max_new_tokens) > max_batch_tokens:
            chunks.append(range(start, i))
            start = i
    if start < len(sorted_lengths):
        chunks.append(range(start, len(sorted_lengths)))
    return chunks


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV-cache bytes one token slot costs on this rank: K and V for each of this pipeline stage's ``layers``, with
    ``kv_heads`` heads on this TP rank (num_query_groups / tp, at least 1), in the model's dtype. Qwen3-1.7B in bf16
    at TP1 PP1: 28 * 2 * 8 * 128 * 2 = 114688 bytes (112 KiB)."""
    return layers * 2 * kv_heads * head_dim * dtype_bytes


# Module attributes megatron switches to turn sequence parallelism off for inference (megatron-core 0.16.1
# transformer/utils.py:275-279, set_model_to_sequence_parallel at :310-330).
_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextmanager
def _generation_forward(core):
    """The model without FP8 and without sequence parallelism for the duration; both restored exactly afterwards.

    FP8: generation runs in the parameters' dtype (bf16). FP8 GEMMs need every forward's token count padded to 16
    (128 for blockwise; ``models.build.FP8_TOKEN_MULTIPLE``), and a decode step has one token per row: megatron's own
    FP8 inference wraps every TE linear to pad the sequence dim to 16 (megatron-core 0.16.1 fp8_utils.py:673-757,
    ``prepare_model_for_fp8_inference``, applied by abstract_model_inference_wrapper.py:81-82), i.e. 16x the GEMM
    rows of a (1, b) decode step, and it would wrap the live training model's forwards for good. Delayed scaling
    would also roll its amax history (and reduce amaxes) once per decode step. The trainer re-scores every sample
    with its own (FP8) forward anyway (``policy.logprobs``), as it does for vLLM's bf16 samples. FP8 is off when
    ``config.fp8`` is None: megatron enters TE's fp8_autocast only then (transformer/transformer_block.py:717-722,
    :750-754); weights stay in their dtype (``fp8_param`` is off), so nothing else changes.
    ``set_is_first_microbatch()`` (transformer/module.py:105-122; it acts only while ``config.fp8`` is set) makes the
    first FP8 forward after generation recast its weights (TE reuses its cached FP8 copy while the flag is False:
    TE v2.11 module/layernorm_linear.py:305-311; megatron's TE wrappers clear it after every forward,
    extensions/transformer_engine.py:671-678), whoever calls the model next.

    Sequence parallelism: one-token decode steps cannot be split along the sequence, and megatron's static
    inference supports it only for MoE models (text_generation_controller.py:1112-1129); we switch it off as
    ``set_model_to_sequence_parallel(model, False)`` does (config flag and the attributes in ``_SP_ATTRS``), keeping
    each module's own value to restore (megatron's helper would set every one of them back to True). The forward is
    the same maths: column-parallel inputs are whole instead of gathered, row-parallel outputs all-reduced instead
    of reduce-scattered.
    """
    cfg = core.config
    fp8, sp = cfg.fp8, cfg.sequence_parallel
    saved = [(m, a, getattr(m, a)) for m in core.modules() for a in _SP_ATTRS if hasattr(m, a)] if sp else []
    if fp8 is not None:
        core.set_is_first_microbatch()
    try:
        cfg.fp8 = None
        cfg.sequence_parallel = False
        for m, a, _ in saved:
            setattr(m, a, False)
        yield
    finally:
        cfg.fp8, cfg.sequence_parallel = fp8, sp
        for m, a, v in saved:
            setattr(m, a, v)
        if fp8 is not None:
            core.set_is_first_microbatch()


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode for the duration; restores every submodule's own train/eval flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module-style wrappers (they keep it in ``.module``)."""
    from megatron.core.models.gpt import GPTModel

    m = model
    while not isinstance(m, GPTModel) and hasattr(m, "module"):
        m = m.module
    if not isinstance(m, GPTModel):
        raise S2DError(f"model: expected a megatron-core GPTModel (possibly wrapped), got {type(model).__name__}")
    return m


@dataclass
class _ChunkOut:
    """Outputs of one chunk, on CPU, indexed by chunk row."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stopped: list[bool]
    topk_ids: list[list[list[int]]] | None
    topk_logprobs: list[list[list[float]]] | None


class MegatronSampler:
    """``RolloutEngine`` on a live megatron-core ``GPTModel`` with a KV cache (see the module docstring).

    Args:
        model: the policy (a GPTModel, or a wrapper holding it in ``.module``); whole model on this rank (PP = 1).
        arch: its ArchSpec (vocab size, EOS ids, max positions).
        tp_group: the tensor-parallel process group; default: the model's own (``model.pg_collection.tp``).
        max_batch_tokens: KV-cache budget per chunk, in token slots (rows * (longest prompt + max_new_tokens)), or
            "auto": sized from the free GPU memory at every ``generate`` (see the module docstring).
        prefill_chunk_tokens: at most this many prompt tokens per prefill forward (bounds activation memory).
        eos_token_ids: tokens that always end a response; default ``arch.eos_token_id`` (int, list or None).
        pad_token_id: filler for unused token-buffer slots (never attended to).
        compact_ratio: compact the batch once the live rows are at most this fraction of it.
    """

    def __init__(
        self,
        model,
        arch: ArchSpec,
        tp_group=None,
        max_batch_tokens: int | str = "auto",
        prefill_chunk_tokens: int = 16384,
        eos_token_ids: Iterable[int] | int | None = None,
        pad_token_id: int = 0,
        compact_ratio: float = 0.75,
    ):
        core = _unwrap(model)
        pp_group = getattr(core.pg_collection, "pp", None)
        self.pp_group = pp_group if pp_group is not None and pp_group.size() > 1 else None
        if self.pp_group is not None:
            pp, stage = self.pp_group.size(), dist.get_rank(self.pp_group)
            if core.pre_process != (stage == 0) or core.post_process != (stage == pp - 1):
                raise S2DError(f"MegatronSampler: pipeline stage {stage} of {pp} has pre_process={core.pre_process}, "
                               f"post_process={core.post_process}: build the model for this pipeline rank")
            self.pp_ranks = [dist.get_global_rank(self.pp_group, i) for i in range(pp)]
            self.pp_stage = stage
        elif not (core.pre_process and core.post_process):
            raise S2DError("MegatronSampler: the model is one pipeline stage but no pipeline group was found "
                           "(model.pg_collection.pp)")
        if core.vocab_size != arch.vocab_size:
            raise S2DError(f"arch.vocab_size = {arch.vocab_size} but the model has vocab_size = {core.vocab_size}")
        for name, value, what in (("max_batch_tokens", max_batch_tokens, "a positive int or 'auto'"),
                                  ("prefill_chunk_tokens", prefill_chunk_tokens, "a positive int")):
            if value == "auto" and name == "max_batch_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise S2DError(f"{name}: expected {what}, got {value!r}")
        if not 0 < compact_ratio <= 1:
            raise S2DError(f"compact_ratio: expected a number in (0, 1], got {compact_ratio!r}")
        if eos_token_ids is None:
            eos_token_ids = arch.eos_token_id
        if eos_token_ids is None:
            eos_token_ids = ()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        for t in (*self.eos_token_ids, pad_token_id):
            if not 0 <= t < arch.vocab_size:
                raise S2DError(f"eos_token_ids / pad_token_id: id {t} is outside the vocabulary [0, {arch.vocab_size})")
        self.model, self.core, self.arch = model, core, arch
        self.tp_group = tp_group if tp_group is not None else core.pg_collection.tp
        self.tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_src = dist.get_global_rank(self.tp_group, 0) if self.tp_size > 1 else 0
        self.max_batch_tokens, self.prefill_chunk_tokens = max_batch_tokens, prefill_chunk_tokens
        self.pad_token_id, self.compact_ratio = pad_token_id, compact_ratio
        self.device = next(core.parameters()).device
        attn = core.decoder.layers[0].self_attention if len(core.decoder.layers) else None
        self.kv_bytes_per_token = kv_bytes_per_token(
            len(core.decoder.layers), attn.num_query_groups_per_partition if attn else 0,
            attn.hidden_size_per_attention_head if attn else 0, core.config.params_dtype.itemsize)

    # ------------------------------------------------------------------------------------------- protocol

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """``params.n`` samples for every prompt; see the module docstring for semantics."""
        self._check(prompts, params)
        self._check_same_across_tp(prompts, params)
        stop_ids = sorted(set(params.stop_token_ids) | set(self.eos_token_ids))
        start = time.perf_counter()
        rows = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        rows.sort(key=lambda r: len(prompts[r[0]]))  # stable: a prompt's samples stay together
        budget = self.batch_token_budget()
        chunks = plan_chunks([len(prompts[p]) for p, _ in rows], params.max_new_tokens, budget)
        keys = [prompt_key(i, p) for i, p in enumerate(prompts)]
        samples: list[list[Sample | None]] = [[None] * params.n for _ in prompts]
        with torch.no_grad(), _eval_mode(self.core), _generation_forward(self.core):
            for chunk in chunks:
                chunk_rows = [rows[i] for i in chunk]
                out = self._generate_chunk(chunk_rows, prompts, keys, params, stop_ids)
                for j, (p, s) in enumerate(chunk_rows):
                    samples[p][s] = Sample(
                        prompt_ids=list(prompts[p]), response_ids=out.tokens[j], logprobs=out.logprobs[j],
                        finish_reason="stop" if out.stopped[j] else "length",
                        topk_ids=out.topk_ids[j] if out.topk_ids is not None else None,
                        topk_logprobs=out.topk_logprobs[j] if out.topk_logprobs is not None else None,
                    )
        metrics = generation_metrics(samples, time.perf_counter() - start)
        metrics["chunks"] = float(len(chunks))
        metrics["max_batch_tokens"] = float(budget)
        return GenerationResult(samples=samples, metrics=metrics)

    def batch_token_budget(self) -> int:
        """This call's KV budget in token slots: ``max_batch_tokens``, or for "auto" what fits in
        ``KV_MEMORY_FRACTION`` of the GPU memory free now (the smallest over the model-parallel group: its ranks must
        cut the same chunks); ``CPU_MAX_BATCH_TOKENS`` on CPU."""
        if self.max_batch_tokens != "auto":
            return self.max_batch_tokens
        if self.device.type != "cuda":
            return CPU_MAX_BATCH_TOKENS
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # reusable
        tokens = int(KV_MEMORY_FRACTION * (free + cached)) // max(self.kv_bytes_per_token, 1)
        t = torch.tensor([max(tokens, 1)], dtype=torch.int64, device=self.device)
        for group in (self.tp_group if self.tp_size > 1 else None, self.pp_group):
            if group is not None:
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t.item())

    def sync_weights(self, policy) -> dict[str, float]:
        """Nothing to do: the sampler generates with the live model's parameters (``policy.module`` is its model)."""
        return {}

    def sleep(self) -> None:
        """Nothing to free: KV caches live only inside ``generate``."""

    def close(self) -> None:
        """Nothing to release: KV caches live only inside ``generate``."""

    # ------------------------------------------------------------------------------------------- checks

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        validate_request(prompts, params, self.arch.vocab_size, self.arch.max_position_embeddings)

    def _check_same_across_tp(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Every rank of the model-parallel group (TP and PP) must run the same generation (each decode step is a
        collective): compare a checksum over each group."""
        groups = [(g, name) for g, name in ((self.tp_group if self.tp_size > 1 else None, "tensor"),
                                            (self.pp_group, "pipeline")) if g is not None]
        if not groups:
            return
        crc = zlib.crc32(repr(params).encode())
        for p in prompts:
            crc = zlib.crc32(repr(p).encode(), crc)
        for group, name in groups:
            t = torch.tensor([crc, -crc], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            if t[0].item() != -t[1].item():
                raise S2DError(f"MegatronSampler.generate: the ranks of a {name}-parallel group were given different "
                               f"prompts or sampling params; every rank of the group must pass the same ones")

    # ------------------------------------------------------------------------------------------- generation

    def _forward(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        """(b, s) token ids -> (b, V) fp32-or-model-dtype logits of the last position, full vocab.

        Pipeline parallel: every stage runs its layers (hidden states (s, b, h) passed stage to stage), and the last
        stage's logits are broadcast over the pipeline group, so every rank runs the same sampling loop.
        """
        if self.pp_group is None:
            out = self.core(input_ids, None, None, inference_context=ctx, runtime_gather_output=True)  # (b, 1, V)
            return out[:, -1]
        b, s = input_ids.shape
        stage, last = self.pp_stage, len(self.pp_ranks) - 1
        if stage > 0:
            hidden = torch.empty((s, b, self.core.config.hidden_size), dtype=self.core.config.params_dtype,
                                 device=self.device)
            dist.recv(hidden, src=self.pp_ranks[stage - 1], group=self.pp_group)
            self.core.set_input_tensor(hidden)
        out = self.core(input_ids, None, None, inference_context=ctx, runtime_gather_output=True)
        if stage < last:
            dist.send(out.contiguous(), dst=self.pp_ranks[stage + 1], group=self.pp_group)  # (s, b, h)
            logits = torch.empty((b, self.arch.vocab_size), dtype=torch.float32, device=self.device)
        else:
            logits = out[:, -1].float().contiguous()
        dist.broadcast(logits, src=self.pp_ranks[last], group=self.pp_group)
        return logits

    def _prefill(self, ids: torch.Tensor, max_seq: int):
        """Prefill unique prompt prefixes ``ids`` (u, L); returns (the inference context, (u, V) logits)."""
        from megatron.core.inference.contexts.static_context import StaticInferenceContext

        ctx = StaticInferenceContext(ids.shape[0], max_seq)
        step = max(1, self.prefill_chunk_tokens // ids.shape[1])
        logits = []
        for s in range(0, ids.shape[0], step):
            ctx.batch_size_offset = s  # this micro-batch's K/V go to cache rows [s, s + step)
            logits.append(self._forward(ids[s: s + step], ctx))
        ctx.batch_size_offset = 0
        ctx.sequence_len_offset = ids.shape[1]
        ctx.enable_decode_mode()
        return ctx, torch.cat(logits)

    @staticmethod
    def _select_cache_rows(ctx, index: torch.Tensor) -> None:
        """Keep/repeat batch rows ``index`` of every layer's K/V cache (batch is dim 1)."""
        for layer, (k, v) in ctx.key_value_memory_dict.items():
            ctx.key_value_memory_dict[layer] = (k.index_select(1, index), v.index_select(1, index))

    def _generate_chunk(self, rows, prompts, keys, params: SamplingParams, stop_ids) -> _ChunkOut:
        dev, b, max_new = self.device, len(rows), params.max_new_tokens
        plens = [len(prompts[p]) for p, _ in rows]
        lmin, smax = min(plens), max(plens) + max_new
        tokens = torch.full((b, smax), self.pad_token_id, dtype=torch.long)  # (b, S) prompt, then response
        for j, (p, _) in enumerate(rows):
            tokens[j, : plens[j]] = torch.tensor(prompts[p], dtype=torch.long)
        tokens = tokens.to(dev)
        plen = torch.tensor(plens, device=dev)  # (b,)
        seq_keys = row_keys(params.seed, torch.tensor([keys[p] for p, _ in rows], device=dev),
                            torch.tensor([s for _, s in rows], device=dev))  # (b,)
        stop_t = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        lp_temp = params.temperature if params.temperature > 0 else 1.0

        first_row = {}  # prompt index -> first chunk row with it: the samples of a prompt share one prefill
        for j, (p, _) in enumerate(rows):
            first_row.setdefault(p, j)
        uniq = list(first_row.values())
        slot = {p: u for u, p in enumerate(first_row)}  # prompt index -> prefill row
        ctx, logits = self._prefill(tokens[uniq, :lmin], smax)
        expand = torch.tensor([slot[p] for p, _ in rows], device=dev)  # (b,) chunk row -> prefill row
        self._select_cache_rows(ctx, expand)
        logits = logits[expand]  # (b, V)

        # outputs have one extra column, max_new: the sink that rows not sampling at a step write to (no host sync to
        # find the rows that sample)
        out_tok = torch.zeros((b, max_new + 1), dtype=torch.long, device=dev)
        out_lp = torch.zeros((b, max_new + 1), dtype=torch.float32, device=dev)
        k = params.logprob_topk
        out_topv = torch.zeros((b, max_new + 1, k), dtype=torch.float32, device=dev) if k else None
        out_topi = torch.zeros((b, max_new + 1, k), dtype=torch.long, device=dev) if k else None
        gen_count = torch.zeros(b, dtype=torch.long, device=dev)  # (b,) response tokens so far
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)
        live = torch.arange(b, device=dev)  # batch position -> chunk row
        active = torch.ones(b, dtype=torch.bool, device=dev)  # per batch position
        cur = lmin  # the position that `logits` predict
        step = 0
        while True:
            sampling = active & (plen[live] <= cur)  # (b_live,) rows past their prompt and not finished
            steps = gen_count[live]
            lg = logits.float()  # (b_live, V)
            # every live row draws (counter-based: a row's draw depends on its key and step only); the others drop it
            tok = sample_tokens(lg, uniforms(seq_keys[live], steps), params.temperature, params.top_k, params.top_p)
            if self.tp_size > 1:
                dist.broadcast(tok, src=self.tp_src, group=self.tp_group)
            col = torch.where(sampling, steps, max_new)  # the sink column for rows that do not sample
            out_tok[live, col] = tok
            out_lp[live, col] = token_logprobs(lg, tok, temperature=lp_temp, check_ids=False)  # ids: drawn above
            if k:
                out_topv[live, col], out_topi[live, col] = topk_logprobs(lg, k, temperature=lp_temp)
            next_tok = torch.where(sampling, tok, tokens[live, cur])  # else the teacher-forced prompt token
            tokens[live, cur] = next_tok
            gen_count[live] += sampling.long()
            is_stop = torch.isin(tok, stop_t) & sampling
            stopped[live] |= is_stop
            active &= ~(is_stop | (sampling & (gen_count[live] >= max_new)))
            if cur + 1 >= smax:  # the last position a row can sample (longest prompt + max_new - 1): all are done
                break
            step += 1
            if step % CHECK_EVERY == 0:
                n_active = int(active.sum())  # the one host sync of the loop
                if n_active == 0:
                    break
                if n_active < live.numel() and n_active <= self.compact_ratio * live.numel():
                    keep = active.nonzero().squeeze(1)
                    self._select_cache_rows(ctx, keep)
                    live, active, next_tok = live[keep], active[keep], next_tok[keep]
            logits = self._forward(next_tok[:, None], ctx)  # (b_live, V) predicting position cur + 1
            ctx.sequence_len_offset += 1
            cur += 1
        return self._to_cpu(out_tok, out_lp, gen_count, stopped, out_topi, out_topv)

    @staticmethod
    def _to_cpu(out_tok, out_lp, gen_count, stopped, out_topi, out_topv) -> _ChunkOut:
        counts = gen_count.tolist()
        toks, lps = out_tok.tolist(), out_lp.tolist()
        topi = out_topi.tolist() if out_topi is not None else None
        topv = out_topv.tolist() if out_topv is not None else None
        return _ChunkOut(
            tokens=[t[:c] for t, c in zip(toks, counts)],
            logprobs=[lp[:c] for lp, c in zip(lps, counts)],
            stopped=stopped.tolist(),
            topk_ids=[t[:c] for t, c in zip(topi, counts)] if topi is not None else None,
            topk_logprobs=[t[:c] for t, c in zip(topv, counts)] if topv is not None else None,
        )
