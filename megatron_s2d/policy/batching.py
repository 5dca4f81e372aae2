"""Token-budget micro-batching of variable-length sequences.

A step's sequences are cut into micro-batches whose *padded* size (rows x longest row) stays within
``micro_batch_tokens``: sequences are sorted by length (longest first, ties by index, so the cut is deterministic) and
packed greedily. Each micro-batch is trimmed to its own longest row, so short sequences do not pay for long ones
(padding waste is reported). Loss normalisers are global (see losses/), so the cut does not change the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_s2d.errors import S2DError


@dataclass(frozen=True)
class MicroBatchPlan:
    groups: list[list[int]]  # row indices of each micro-batch
    lengths: list[int]  # padded length of each micro-batch

    @property
    def padded_tokens(self) -> int:
        return sum(len(g) * l for g, l in zip(self.groups, self.lengths))


def plan_micro_batches(lengths: list[int], micro_batch_tokens: int) -> MicroBatchPlan:
    """Greedy, deterministic packing of rows into micro-batches under a padded-token budget."""
    if not lengths:
        return MicroBatchPlan([], [])
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if lengths[order[0]] > micro_batch_tokens:
        raise S2DError(f"micro_batch_tokens = {micro_batch_tokens} is smaller than the longest sequence "
                       f"({lengths[order[0]]} tokens): raise micro_batch_tokens")
    groups, lens, cur, cur_len = [], [], [], 0
    for i in order:
        new_len = max(cur_len, lengths[i])
        if cur and new_len * (len(cur) + 1) > micro_batch_tokens:
            groups.append(cur)
            lens.append(cur_len)
            cur, new_len = [], lengths[i]
        cur.append(i)
        cur_len = new_len
    groups.append(cur)
    lens.append(cur_len)
    return MicroBatchPlan(groups, lens)


def slice_batch(batch: dict[str, torch.Tensor], rows: list[int], length: int) -> dict[str, torch.Tensor]:
    """Select ``rows`` and trim the time axis (dim 1) to ``length`` for every (N, T, ...) tensor in ``batch``."""
    idx = torch.tensor(rows, dtype=torch.long)
    out = {}
    for k, v in batch.items():
        v = v.index_select(0, idx.to(v.device))
        out[k] = v[:, :length] if v.dim() >= 2 else v
    return out
