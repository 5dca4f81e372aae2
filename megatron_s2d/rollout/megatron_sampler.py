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
  cache is rectangular). A single row longer than the budget runs alone.
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
  ``generate`` together. Sequence parallelism is refused (one-token decode steps cannot be split along the sequence).
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

__all__ = ["MegatronSampler", "plan_chunks"]


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
        max_batch_tokens: KV-cache budget per chunk, in token slots (rows * (longest prompt + max_new_tokens)).
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
        max_batch_tokens: int = 65536,
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
        if core.config.sequence_parallel:
            raise S2DError("MegatronSampler: sequence_parallel = True is not supported for KV-cached decoding; "
                           "build the policy without sequence parallelism or use the vLLM engine")
        if core.vocab_size != arch.vocab_size:
            raise S2DError(f"arch.vocab_size = {arch.vocab_size} but the model has vocab_size = {core.vocab_size}")
        for name, value in (("max_batch_tokens", max_batch_tokens), ("prefill_chunk_tokens", prefill_chunk_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise S2DError(f"{name}: expected a positive int, got {value!r}")
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

    # ------------------------------------------------------------------------------------------- protocol

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """``params.n`` samples for every prompt; see the module docstring for semantics."""
        self._check(prompts, params)
        self._check_same_across_tp(prompts, params)
        stop_ids = sorted(set(params.stop_token_ids) | set(self.eos_token_ids))
        start = time.perf_counter()
        rows = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        rows.sort(key=lambda r: len(prompts[r[0]]))  # stable: a prompt's samples stay together
        chunks = plan_chunks([len(prompts[p]) for p, _ in rows], params.max_new_tokens, self.max_batch_tokens)
        keys = [prompt_key(i, p) for i, p in enumerate(prompts)]
        samples: list[list[Sample | None]] = [[None] * params.n for _ in prompts]
        with torch.no_grad(), _eval_mode(self.core):
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
        return GenerationResult(samples=samples, metrics=metrics)

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

        out_tok = torch.zeros((b, max_new), dtype=torch.long, device=dev)
        out_lp = torch.zeros((b, max_new), dtype=torch.float32, device=dev)
        k = params.logprob_topk
        out_topv = torch.zeros((b, max_new, k), dtype=torch.float32, device=dev) if k else None
        out_topi = torch.zeros((b, max_new, k), dtype=torch.long, device=dev) if k else None
        gen_count = torch.zeros(b, dtype=torch.long, device=dev)  # (b,) response tokens so far
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)
        live = torch.arange(b, device=dev)  # batch position -> chunk row
        active = torch.ones(b, dtype=torch.bool, device=dev)  # per batch position
        cur = lmin  # the position that `logits` predict
        while True:
            next_tok = tokens[live, cur]  # teacher-forced prompt token, overwritten where we sample
            gidx = (active & (plen[live] <= cur)).nonzero().squeeze(1)  # batch positions that sample now
            if gidx.numel():
                rg = live[gidx]  # chunk rows
                steps = gen_count[rg]
                lg = logits[gidx].float()  # (g, V)
                tok = sample_tokens(lg, uniforms(seq_keys[rg], steps), params.temperature, params.top_k, params.top_p)
                if self.tp_size > 1:
                    dist.broadcast(tok, src=self.tp_src, group=self.tp_group)
                out_tok[rg, steps] = tok
                out_lp[rg, steps] = token_logprobs(lg, tok, temperature=lp_temp)
                if k:
                    out_topv[rg, steps], out_topi[rg, steps] = topk_logprobs(lg, k, temperature=lp_temp)
                next_tok[gidx] = tok
                gen_count[rg] += 1
                is_stop = torch.isin(tok, stop_t)
                stopped[rg] = is_stop
                active[gidx] = ~(is_stop | (gen_count[rg] >= max_new))
                tokens[rg, cur] = tok
            n_active = int(active.sum())
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
