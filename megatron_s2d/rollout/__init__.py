"""Rollout engines behind one protocol: the megatron-native KV-cached sampler (here) and vLLM (imported lazily)."""

from megatron_s2d.rollout.base import GenerationResult, RolloutEngine, Sample, SamplingParams
from megatron_s2d.rollout.megatron_sampler import MegatronSampler

__all__ = ["GenerationResult", "MegatronSampler", "RolloutEngine", "Sample", "SamplingParams"]
