"""Samples of a generation -> the typed training batch (``policy.batch.RolloutBatch``)."""

from __future__ import annotations

from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.rollout.base import GenerationResult, Sample


def flatten(result: GenerationResult) -> list[Sample]:
    """Samples prompt-major: [p0 s0 .. s(n-1), p1 s0, ...] (the layout GRPO groups and advantages assume)."""
    return [s for group in result.samples for s in group]


def to_batch(samples: list[Sample], pad_id: int) -> RolloutBatch:
    """Right-padded tensors of ``samples``, with the engine's top-k when it recorded one."""
    topk = bool(samples) and samples[0].topk_ids is not None
    return RolloutBatch.from_rows(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], [s.logprobs for s in samples], pad_id,
        topk_ids=[s.topk_ids for s in samples] if topk else None,
        topk_logprobs=[s.topk_logprobs for s in samples] if topk else None)
