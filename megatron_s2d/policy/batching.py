"""Token-budget micro-batching of variable-length sequences: padded rows, or packed (padding-free) rows.

Padded (:func:`plan_micro_batches`): a step's sequences are cut into micro-batches whose *padded* size (rows x
longest row) stays within ``micro_batch_tokens``: sequences are sorted by length (longest first, ties by index, so the
cut is deterministic) and grouped greedily. Each micro-batch is trimmed to its own longest row, so short sequences do
not pay for long ones (padding waste is reported).

Packed (:func:`plan_packs` + :func:`pack_rows`): each micro-batch is ONE row holding several whole sequences back to
back (first-fit decreasing under ``micro_batch_tokens`` real tokens), so no token is padding. The model attends
within each sequence only (THD ``cu_seqlens`` with Transformer Engine, a block-diagonal causal mask otherwise); the
per-row fields stay per-row, and ``pack_index`` maps each row position to its packed position, so the objectives
compute on the packed logits and hand the losses the usual (rows, T) tensors (see ``objectives``).

Loss normalisers are global (see losses/), so neither cut changes the objective.

Token multiple (``multiple``, ``models.build.token_multiple``): FP8 GEMMs need every forward's token count to be a
multiple of 16 (128 for blockwise scaling), and sequence parallelism a multiple of the TP size. A padded micro-batch's
length is rounded up to it (the extra positions are zero: ``loss_mask`` 0, so no loss, and causal attention keeps
them from reaching a real token); a packed row gets a filler sequence of its own at the end
(:func:`pad_packed`), whose logits are dropped before the objective sees them.
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


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _longest_first(lengths: list[int], micro_batch_tokens: int, multiple: int = 1) -> list[int]:
    """Row indices by length, longest first (ties by index: deterministic); every row must fit the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    if round_up(longest, multiple) > micro_batch_tokens:
        padded = f", {round_up(longest, multiple)} once padded to a multiple of {multiple} (FP8 / sequence " \
                 "parallelism)" if multiple > 1 else ""
        raise S2DError(f"micro_batch_tokens = {micro_batch_tokens} is smaller than the longest sequence "
                       f"({longest} tokens{padded}): raise micro_batch_tokens")
    return order


def plan_micro_batches(lengths: list[int], micro_batch_tokens: int, multiple: int = 1) -> MicroBatchPlan:
    """Greedy, deterministic packing of rows into micro-batches under a padded-token budget; each micro-batch's
    length is its longest row rounded up to ``multiple``."""
    if not lengths:
        return MicroBatchPlan([], [])
    order = _longest_first(lengths, micro_batch_tokens, multiple)
    groups, lens, cur, cur_len = [], [], [], 0
    for i in order:
        new_len = max(cur_len, round_up(lengths[i], multiple))
        if cur and new_len * (len(cur) + 1) > micro_batch_tokens:
            groups.append(cur)
            lens.append(cur_len)
            cur, new_len = [], round_up(lengths[i], multiple)
        cur.append(i)
        cur_len = new_len
    groups.append(cur)
    lens.append(cur_len)
    return MicroBatchPlan(groups, lens)


def scatter_rows(parts, n: int, t: int) -> dict[str, torch.Tensor]:
    """Reassemble per-row values into (n, t, ...) CPU tensors: ``parts`` yields (row indices, {key: (r, T_r, ...)});
    positions past T_r stay zero, positions past t (padding to a token multiple) are dropped."""
    out: dict[str, torch.Tensor] = {}
    for rows, values in parts:
        for k, v in values.items():
            if k not in out:
                out[k] = torch.zeros((n, t) + tuple(v.shape[2:]), dtype=v.dtype)
            w = min(v.shape[1], t)
            out[k][rows, :w] = v[:, :w].cpu()
    return out


def slice_batch(batch: dict[str, torch.Tensor], rows: list[int], length: int) -> dict[str, torch.Tensor]:
    """Select ``rows`` and set the time axis (dim 1) of every (N, T, ...) tensor in ``batch`` to ``length``: trimmed,
    or zero-padded past T (a length rounded up to a token multiple)."""
    idx = torch.tensor(rows, dtype=torch.long)
    out = {}
    for k, v in batch.items():
        v = v.index_select(0, idx.to(v.device))
        if v.dim() >= 2 and v.shape[1] < length:
            v = torch.cat([v, v.new_zeros((v.shape[0], length - v.shape[1]) + tuple(v.shape[2:]))], dim=1)
        out[k] = v[:, :length] if v.dim() >= 2 else v
    return out


def placeholder_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One zero-weight row (2 pad tokens, ``loss_mask`` all zero, every other field zero) with the fields and
    trailing shapes of the empty ``batch`` (0 rows). A rank whose share of a step is empty trains on it, so it joins
    the step's collectives (gradient all-reduce, pipeline sends) with a zero loss and zero gradients, instead of
    leaving the other ranks waiting."""
    if batch["tokens"].shape[0] != 0:
        raise S2DError(f"placeholder_batch: expected an empty batch, got {batch['tokens'].shape[0]} rows")
    out = {}
    for k, v in batch.items():
        shape = (1,) if v.dim() == 1 else (1, 2) + tuple(v.shape[2:])
        out[k] = torch.zeros(shape, dtype=v.dtype, device=v.device)
    out["lengths"] = torch.tensor([2], dtype=batch["lengths"].dtype)
    return out


def plan_packs(lengths: list[int], micro_batch_tokens: int, multiple: int = 1) -> MicroBatchPlan:
    """First-fit decreasing bins of whole sequences with at most ``micro_batch_tokens`` real tokens each (rounded
    down to ``multiple``, so that a bin padded by :func:`pad_packed` stays within the budget).

    ``lengths`` of the plan are the packed lengths (sum of the bin's sequence lengths, rounded up to ``multiple``:
    what the model runs on). Deterministic.
    """
    if not lengths:
        return MicroBatchPlan([], [])
    order = _longest_first(lengths, micro_batch_tokens, multiple)
    micro_batch_tokens -= micro_batch_tokens % multiple  # a row fits iff round_up(length, multiple) <= the budget
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(micro_batch_tokens - lengths[i])
    return _PackPlan(bins, [round_up(micro_batch_tokens - r, multiple) for r in room])


class _PackPlan(MicroBatchPlan):
    @property
    def padded_tokens(self) -> int:
        return sum(self.lengths)  # nothing is padding but the filler up to the token multiple


def pack_rows(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The micro-batch of ``rows`` in packed form.

    Per-row fields are those of :func:`slice_batch` (rows x their longest length). Added:
      packed_tokens (1, S) the rows' tokens back to back, S = sum of lengths
      pack_index    (n, T) long: packed position of row r, time t (0 where t >= length)
      pack_valid    (n, T) bool: t < length
      cu_seqlens    (n + 1,) int32: sequence boundaries in the packed row (THD attention)
      pack_positions (1, S) long: position of each packed token within its own sequence
    """
    lengths = [int(batch["lengths"][r]) for r in rows]
    out = slice_batch(batch, rows, max(lengths))
    t = torch.arange(max(lengths))
    lens = torch.tensor(lengths)
    ends = torch.cumsum(lens, 0)  # (n,)
    starts = ends - lens
    valid = t[None, :] < lens[:, None]  # (n, T)
    index = (starts[:, None] + t[None, :]) * valid  # (n, T)
    out["packed_tokens"] = out["tokens"][valid].unsqueeze(0)  # row-major: rows in order, each in time order
    out["pack_index"] = index
    out["pack_valid"] = valid
    out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32), ends.to(torch.int32)])
    out["pack_positions"] = t.expand(len(rows), -1)[valid].unsqueeze(0)
    return out


def pad_packed(tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
               multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model input of a packed row padded to a multiple of ``multiple`` tokens: a filler sequence of zeros
    (positions 0.., its own ``cu_seqlens`` segment) appended, so attention keeps it apart from every real sequence.
    (1, S) tokens and positions, (n + 1,) cu_seqlens -> (1, S'), (1, S'), (n + 2,) or unchanged when S is a multiple;
    the caller drops the logits past S."""
    s = tokens.shape[1]
    pad = round_up(s, multiple) - s
    if pad == 0:
        return tokens, positions, cu_seqlens
    tokens = torch.cat([tokens, tokens.new_zeros((1, pad))], dim=1)
    positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype, device=positions.device)[None]], dim=1)
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([s + pad])])
    return tokens, positions, cu_seqlens


def block_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(1, 1, S, S) bool attention mask, True = masked: causal within each packed sequence, nothing across."""
    total = int(cu_seqlens[-1])
    seg = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    pos = torch.arange(total)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]
