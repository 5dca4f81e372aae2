"""Turn rollouts into right-padded training tensors (the layout ``policy.objectives`` documents)."""

from __future__ import annotations

import torch

from megatron_s2d.rollout.base import Sample


def samples_to_batch(samples: list[Sample], pad_id: int, topk: bool = False) -> dict[str, torch.Tensor]:
    """(N, T) tokens / loss_mask / engine_logprobs (+ (N, T, K) top-k) from N samples.

    Per-token fields sit at the position of the generated token (position p + i for response token i of a prompt
    of length p), matching ``objectives.target_logprobs``.
    """
    n = len(samples)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    t = max(lengths)
    tokens = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros(n, t)
    engine_lp = torch.zeros(n, t)
    k = len(samples[0].topk_ids[0]) if topk and samples[0].topk_ids else 0
    if topk:
        topk_ids = torch.zeros(n, t, max(k, 1), dtype=torch.long)
        topk_lp = torch.zeros(n, t, max(k, 1))
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, :p] = torch.tensor(s.prompt_ids)
        if r:
            tokens[i, p:p + r] = torch.tensor(s.response_ids)
            mask[i, p:p + r] = 1.0
            engine_lp[i, p:p + r] = torch.tensor(s.logprobs, dtype=torch.float32)
            if topk and s.topk_ids:
                topk_ids[i, p:p + r] = torch.tensor(s.topk_ids)
                topk_lp[i, p:p + r] = torch.tensor(s.topk_logprobs, dtype=torch.float32)
    batch = {"tokens": tokens, "lengths": torch.tensor(lengths), "loss_mask": mask, "engine_logprobs": engine_lp}
    if topk:
        batch["topk_ids"], batch["topk_logprobs"] = topk_ids, topk_lp
    return batch


def select_rows(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    idx = torch.tensor(rows, dtype=torch.long)
    return {k: v.index_select(0, idx) for k, v in batch.items()}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))
