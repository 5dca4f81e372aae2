"""Per-token log-probs, entropy and top-k log-probs from vocab-parallel logits, without gathering the vocabulary.

Under tensor parallelism (TP) megatron-core's output layer is a ColumnParallelLinear: rank r of the TP group holds
the logits of vocab rows [r * V_local, (r + 1) * V_local). Everything here works on that shard only:

    log p(v) = z_v - lse,    lse = m + log sum_{ranks} sum_{local v} exp(z_v - m),    m = max_{ranks} max_{local v} z_v

so each chunk of rows costs one all-reduce MAX (m) and one all-reduce SUM (the shard's sum of exp, packed together
with the target logits, which only the owning rank contributes; the others add zero). No rank ever holds more than
its own V_local columns.

Gradients are analytic (custom autograd Functions) and need no collective in backward:

    d log p(y) / dz = onehot(y) - softmax(z)            d H / dz = -p * (log p + H)

each computed on this rank's shard from the saved per-row `lse` (and `H`). The result is this rank's slice of the
full-vocab gradient; the ColumnParallelLinear backward all-reduces its input gradient across TP as usual.

Memory: with ``chunk_size`` set, the flattened B*T rows are processed ``chunk_size`` at a time in forward *and*
backward, so fp32 temporaries are O(chunk_size * V_local) whatever the sequence length. Only per-row statistics are
saved for backward, plus a reference to the input logits.

Precision: logits are upcast to fp32 (fp64 input stays fp64, so `torch.autograd.gradcheck` applies); outputs are
fp32 for bf16/fp16/fp32 input; gradients come back in the logits' dtype. ``temperature`` divides the logits first
(log-probs consistent with sampling at that temperature).

Top-k ties: candidates are ranked by the (max-shifted) logit, ties broken by the lower token id. Because the shift
by the global max is exact, the selected ids do not depend on the TP layout.

Every rank of ``tp_group`` must call these functions together with the same shapes and ``chunk_size``: each chunk
is a collective. ``tp_group=None`` (or a group of size 1) means no communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_s2d.errors import S2DError

__all__ = ["entropy", "tail_logprob", "token_logprobs", "topk_logprobs"]


@dataclass(frozen=True)
class _Shard:
    """Where this rank's vocab columns sit in the full vocabulary."""

    group: object | None  # torch.distributed ProcessGroup, or None for no communication
    rank: int
    world: int
    v_local: int

    @property
    def vocab_start(self) -> int:
        return self.rank * self.v_local

    @property
    def vocab_size(self) -> int:
        return self.world * self.v_local

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> None:
        if self.world > 1:
            dist.all_reduce(t, op=op, group=self.group)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate `t` (n, c) from every rank along dim 1, in rank order -> (n, c * world)."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------- input checking


def _shard_of(logits: torch.Tensor, tp_group) -> _Shard:
    if logits.dim() < 2:
        raise S2DError(f"logits: expected shape (B, T, V_local) (at least 2 dims), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise S2DError(f"logits: expected a floating-point tensor, got dtype {logits.dtype}")
    v_local = logits.shape[-1]
    if v_local == 0:
        raise S2DError("logits: the vocab dimension (last) is empty")
    if tp_group is None:
        return _Shard(None, 0, 1, v_local)
    if not dist.is_initialized():
        raise S2DError("tp_group: a process group was given but torch.distributed is not initialised")
    rank = dist.get_rank(group=tp_group)
    if rank < 0:
        raise S2DError("tp_group: this process is not a member of the given tensor-parallel group")
    return _Shard(tp_group, rank, dist.get_world_size(group=tp_group), v_local)


def _check_options(chunk_size: int | None, temperature: float) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise S2DError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise S2DError(f"temperature: expected a finite number > 0, got {temperature!r}")


def _flat_targets(logits: torch.Tensor, target_ids: torch.Tensor, shard: _Shard,
                  check_ids: bool = True) -> tuple[torch.Tensor, bool]:
    """Check `target_ids` against `logits` (*lead, V_local); return ids (N, K) int64 and whether K was given.
    ``check_ids``: also check that every id is in the vocabulary (one host sync on a GPU)."""
    lead = logits.shape[:-1]
    if target_ids.dtype in (torch.bool,) or target_ids.is_floating_point() or target_ids.is_complex():
        raise S2DError(f"target_ids: expected an integer tensor, got dtype {target_ids.dtype}")
    if target_ids.shape == lead:
        has_k = False
    elif target_ids.dim() == len(lead) + 1 and target_ids.shape[:-1] == lead:
        has_k = True
    else:
        raise S2DError(
            f"target_ids: shape {tuple(target_ids.shape)} does not match logits {tuple(logits.shape)}; expected "
            f"{tuple(lead)} or {tuple(lead)} + (K,)"
        )
    ids = target_ids.reshape(-1, target_ids.shape[-1] if has_k else 1).to(device=logits.device, dtype=torch.long)
    if check_ids and ids.numel() and bool((ids.min() < 0) | (ids.max() >= shard.vocab_size)):
        bad = ids[(ids < 0) | (ids >= shard.vocab_size)][0].item()
        raise S2DError(f"target_ids: id {bad} is outside the vocabulary [0, {shard.vocab_size})")
    return ids, has_k


# --------------------------------------------------------------------------------------------- shared helpers


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_chunks(n: int, chunk_size: int | None) -> Iterator[slice]:
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


def _scaled(chunk: torch.Tensor, dtype: torch.dtype, temperature: float,
            buf: torch.Tensor | None = None) -> torch.Tensor:
    """A `dtype` copy of a logits chunk divided by the temperature (safe to modify in place), written into
    ``buf[:rows]`` when given (a work buffer reused across chunks: no allocation per chunk)."""
    z = chunk.to(dtype, copy=True) if buf is None else buf[: chunk.shape[0]].copy_(chunk)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _work_buffer(logits: torch.Tensor, dtype: torch.dtype, chunk_size: int | None) -> torch.Tensor | None:
    """One (chunk, V_local) buffer for chunked loops (None when unchunked: a single chunk allocates once anyway)."""
    n = logits.shape[0]
    if chunk_size is None or chunk_size >= n:
        return None
    return torch.empty(chunk_size, logits.shape[1], dtype=dtype, device=logits.device)


def _global_max(z: torch.Tensor, shard: _Shard) -> torch.Tensor:
    m = z.amax(dim=-1)  # (n,)
    shard.all_reduce(m, dist.ReduceOp.MAX)
    return m


# --------------------------------------------------------------------------------------------- token log-probs


class _TokenLogprobs(torch.autograd.Function):
    """log p(ids) for logits (N, V_local) and global ids (N, K) -> (N, K); analytic, chunked backward.

    With ``with_entropy`` it also returns the entropy per row (N,) from the same pass over the logits (the shifted
    logits and their exponentials are already at hand: one extra dot product per row, no second read of the
    logits, no extra collective); that output carries no gradient (a metric).
    """

    @staticmethod
    def forward(ctx, logits, ids, shard: _Shard, chunk_size, temperature, with_entropy):
        cdt = _compute_dtype(logits)
        floor = torch.finfo(cdt).min
        n = logits.shape[0]
        local = ids - shard.vocab_start  # (N, K)
        owned = (local >= 0) & (local < shard.v_local)  # (N, K) this rank holds the target's column
        local = local.clamp_(0, shard.v_local - 1)
        out = torch.empty(ids.shape, dtype=cdt, device=logits.device)  # (N, K)
        lse = torch.empty(n, dtype=cdt, device=logits.device)  # (N,)
        ent = torch.empty(n if with_entropy else 0, dtype=cdt, device=logits.device)  # (N,) or (0,)
        zbuf = _work_buffer(logits, cdt, chunk_size)
        ebuf = _work_buffer(logits, cdt, chunk_size) if with_entropy else None
        for rows in _row_chunks(n, chunk_size):
            z = _scaled(logits[rows], cdt, temperature, zbuf)  # (n_c, V_local)
            m = _global_max(z, shard)  # (n_c,)
            tgt = z.gather(1, local[rows]).masked_fill_(~owned[rows], 0.0)  # (n_c, K)
            if with_entropy:
                z.sub_(m[:, None]).clamp_(min=floor)  # z' = z - m (finite, so 0 * z' stays 0)
                e = torch.exp(z, out=ebuf[: z.shape[0]]) if ebuf is not None else z.exp()  # (n_c, V_local)
                s_e = e.sum(dim=-1, keepdim=True)  # (n_c, 1)
                ez = z.mul_(e).sum(dim=-1, keepdim=True)  # (n_c, 1) sum_v e^z' z'
                stats = torch.cat([s_e, ez, tgt], dim=1)  # (n_c, 2 + K)
                del e
            else:
                z.sub_(m[:, None]).exp_()
                stats = torch.cat([z.sum(dim=-1, keepdim=True), tgt], dim=1)  # (n_c, 1 + K)
            del z
            shard.all_reduce(stats, dist.ReduceOp.SUM)
            log_s = stats[:, 0].log()  # (n_c,)
            lse[rows] = m + log_s
            if with_entropy:
                ent[rows] = log_s - stats[:, 1] / stats[:, 0]  # H = log S - E_p[z'] (shift-invariant)
            out[rows] = (stats[:, 2 if with_entropy else 1:] - m[:, None]) - log_s[:, None]
        ctx.save_for_backward(logits, local, owned, lse)
        ctx.shard, ctx.chunk_size, ctx.temperature = shard, chunk_size, temperature
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_ent):
        logits, local, owned, lse = ctx.saved_tensors
        g = grad_out.to(lse.dtype)  # (N, K)
        g_sum = g.sum(dim=-1)  # (N,) weight of -softmax
        g_owned = g.masked_fill(~owned, 0.0)  # (N, K) weight of onehot(target), only where this rank owns it
        grad = torch.empty_like(logits)  # (N, V_local)
        pbuf = _work_buffer(logits, lse.dtype, ctx.chunk_size)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_size):
            p = _scaled(logits[rows], lse.dtype, ctx.temperature, pbuf).sub_(lse[rows, None]).exp_()  # softmax
            p.mul_(-g_sum[rows, None]).scatter_add_(1, local[rows], g_owned[rows])
            if ctx.temperature != 1.0:
                p.div_(ctx.temperature)
            grad[rows] = p
        return grad, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    check_ids: bool = True,
):
    """Log-probs of `target_ids` under softmax(logits / temperature), from a vocab-parallel shard.

    Args:
        logits: (B, T, V_local) this rank's vocab shard (rows [rank * V_local, (rank + 1) * V_local)), any float
            dtype. Any leading shape works; (B, T) is the usual one.
        target_ids: (B, T) or (B, T, K) global token ids in [0, V_local * tp_size).
        tp_group: the tensor-parallel ProcessGroup, or None for TP=1 without torch.distributed.
        chunk_size: rows of the flattened B*T processed at a time (forward and backward); None = all at once.
        temperature: the logits are divided by it first.
        return_entropy: also return the entropy (B, T) of softmax(logits / temperature), computed in the same
            pass (no gradient: a metric; use :func:`entropy` for a differentiable one).
        check_ids: refuse ids outside the vocabulary (S2DError). It costs a host sync: a caller whose ids come from
            sampling over the same vocabulary (the megatron sampler's decode loop) passes False.

    Returns:
        (B, T) or (B, T, K) fp32 log-probs (fp64 for fp64 logits), differentiable w.r.t. `logits`; the gradient is
        this rank's slice of the full-vocab gradient. With ``return_entropy``: (log-probs, entropy).
    """
    shard = _shard_of(logits, tp_group)
    _check_options(chunk_size, temperature)
    ids, has_k = _flat_targets(logits, target_ids, shard, check_ids)  # (N, K)
    flat = logits.reshape(-1, shard.v_local)  # (N, V_local)
    out, ent = _TokenLogprobs.apply(flat, ids, shard, chunk_size, float(temperature), bool(return_entropy))
    out = out.reshape(target_ids.shape) if has_k else out.reshape(logits.shape[:-1])
    return (out, ent.reshape(logits.shape[:-1])) if return_entropy else out


# --------------------------------------------------------------------------------------------- tail mass


def _owned_columns(local: torch.Tensor, owned: torch.Tensor, v_local: int) -> torch.Tensor:
    """(n, V_local) bool: the columns of this shard that hold one of the ids. Non-owned ids were clamped onto some
    column, possibly one an owned id also names: counting (scatter_add) instead of writing flags (scatter) keeps a
    duplicate index from overwriting an owned column's flag."""
    hits = torch.zeros(local.shape[0], v_local, dtype=torch.int32, device=local.device)
    return hits.scatter_add_(1, local, owned.to(torch.int32)) > 0


class _TailLogprob(torch.autograd.Function):
    """log sum_{v not in ids} p(v) for logits (N, V_local) and global ids (N, K) -> (N,); analytic, chunked backward.

    The mass outside the ids is summed directly (the ids' columns masked out), never as 1 - sum(p(ids)): that
    difference rounds to 0 (or below) when the ids hold almost all the mass, and a floor on it would cut the gradient
    that should pull mass back into the tail. Both log-sum-exps are shifted by their own global max, so a tail of
    1e-30 is still exact. Gradient: d log P_tail / dz = q - p, with p = softmax(z) and q = softmax(z) restricted to
    the tail and renormalised. When the ids cover the whole vocabulary the tail is empty: -inf, zero gradient.
    """

    @staticmethod
    def forward(ctx, logits, ids, shard: _Shard, chunk_size, temperature):
        cdt = _compute_dtype(logits)
        n = logits.shape[0]
        local = ids - shard.vocab_start  # (N, K)
        owned = (local >= 0) & (local < shard.v_local)
        local = local.clamp_(0, shard.v_local - 1)
        lse = torch.empty(n, dtype=cdt, device=logits.device)  # (N,) over the whole vocabulary
        lse_tail = torch.empty(n, dtype=cdt, device=logits.device)  # (N,) over the ids' complement
        neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=logits.device)
        for rows in _row_chunks(n, chunk_size):
            z = _scaled(logits[rows], cdt, temperature)  # (n_c, V_local)
            zt = z.masked_fill(_owned_columns(local[rows], owned[rows], shard.v_local), float("-inf"))
            m = torch.stack([z.amax(dim=-1), zt.amax(dim=-1)], dim=1)  # (n_c, 2)
            shard.all_reduce(m, dist.ReduceOp.MAX)
            m_all, m_tail = m[:, 0], m[:, 1]
            safe = torch.where(torch.isfinite(m_tail), m_tail, torch.zeros_like(m_tail))
            sums = torch.stack([(z - m_all[:, None]).exp_().sum(dim=-1),
                                (zt - safe[:, None]).exp_().sum(dim=-1)], dim=1)  # (n_c, 2)
            del z, zt
            shard.all_reduce(sums, dist.ReduceOp.SUM)
            lse[rows] = m_all + sums[:, 0].log()
            lse_tail[rows] = torch.where(torch.isfinite(m_tail), safe + sums[:, 1].log(), neg_inf)
        ctx.save_for_backward(logits, local, owned, lse, lse_tail)
        ctx.shard, ctx.chunk_size, ctx.temperature = shard, chunk_size, temperature
        return lse_tail - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, local, owned, lse, lse_tail = ctx.saved_tensors
        g = grad_out.to(lse.dtype)  # (N,)
        empty = ~torch.isfinite(lse_tail)  # no tail: the value is a constant -inf
        g = g.masked_fill(empty, 0.0)
        lse_tail = lse_tail.masked_fill(empty, 0.0)
        grad = torch.empty_like(logits)  # (N, V_local)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_size):
            z = _scaled(logits[rows], lse.dtype, ctx.temperature)  # (n_c, V_local)
            q = (z - lse_tail[rows, None]).exp_().masked_fill_(
                _owned_columns(local[rows], owned[rows], logits.shape[1]), 0.0)
            q.sub_(z.sub_(lse[rows, None]).exp_()).mul_(g[rows, None])  # g * (q - p)
            if ctx.temperature != 1.0:
                q.div_(ctx.temperature)
            grad[rows] = q
        return grad, None, None, None, None


def tail_logprob(
    logits: torch.Tensor,
    ids: torch.Tensor,
    tp_group=None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log of the probability mass OUTSIDE ``ids`` under softmax(logits / temperature), from a vocab shard.

    Args:
        logits: (B, T, V_local) this rank's vocab shard (any leading shape works).
        ids: (B, T, K) distinct global token ids per position (e.g. a top-k set).
        tp_group, chunk_size, temperature: as in :func:`token_logprobs`.

    Returns:
        (B, T) fp32 log tail mass (fp64 for fp64 logits), differentiable w.r.t. `logits` (exact, no floor; see
        :class:`_TailLogprob`); -inf where ``ids`` cover the whole vocabulary.
    """
    shard = _shard_of(logits, tp_group)
    _check_options(chunk_size, temperature)
    flat_ids, has_k = _flat_targets(logits, ids, shard)
    if not has_k:
        raise S2DError(f"ids: expected shape {tuple(logits.shape[:-1])} + (K,), got {tuple(ids.shape)}")
    flat = logits.reshape(-1, shard.v_local)  # (N, V_local)
    out = _TailLogprob.apply(flat, flat_ids, shard, chunk_size, float(temperature))
    return out.reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------- entropy


class _Entropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v for logits (N, V_local) -> (N,); analytic, chunked backward."""

    @staticmethod
    def forward(ctx, logits, shard: _Shard, chunk_size, temperature):
        cdt = _compute_dtype(logits)
        floor = torch.finfo(cdt).min  # -inf logits -> a finite floor, so that 0 * z stays 0 instead of NaN
        n = logits.shape[0]
        ent = torch.empty(n, dtype=cdt, device=logits.device)  # (N,)
        lse = torch.empty(n, dtype=cdt, device=logits.device)  # (N,)
        for rows in _row_chunks(n, chunk_size):
            z = _scaled(logits[rows], cdt, temperature)  # (n_c, V_local)
            m = _global_max(z, shard)  # (n_c,)
            z.sub_(m[:, None]).clamp_(min=floor)  # z' = z - m <= 0
            e = z.exp()  # (n_c, V_local)
            s = e.sum(dim=-1)  # (n_c,)
            stats = torch.stack([s, e.mul_(z).sum(dim=-1)], dim=1)  # (n_c, 2): sum e^z', sum e^z' z'
            del z, e
            shard.all_reduce(stats, dist.ReduceOp.SUM)
            log_s = stats[:, 0].log()
            ent[rows] = log_s - stats[:, 1] / stats[:, 0]  # H = log S - E_p[z'] (shift-invariant)
            lse[rows] = m + log_s
        ctx.save_for_backward(logits, lse, ent)
        ctx.shard, ctx.chunk_size, ctx.temperature = shard, chunk_size, temperature
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, lse, ent = ctx.saved_tensors
        floor = torch.finfo(lse.dtype).min
        g = grad_out.to(lse.dtype)  # (N,)
        grad = torch.empty_like(logits)  # (N, V_local)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_size):
            logp = _scaled(logits[rows], lse.dtype, ctx.temperature).sub_(lse[rows, None]).clamp_(min=floor)
            p = logp.exp()
            logp.add_(ent[rows, None]).mul_(p).mul_(-g[rows, None])  # -g * p * (log p + H)
            del p
            if ctx.temperature != 1.0:
                logp.div_(ctx.temperature)
            grad[rows] = logp
        return grad, None, None, None


def entropy(
    logits: torch.Tensor, tp_group=None, chunk_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, from a vocab-parallel shard.

    Args:
        logits: (B, T, V_local) this rank's vocab shard (any leading shape works).
        tp_group, chunk_size, temperature: as in :func:`token_logprobs`.

    Returns:
        (B, T) fp32 entropy in nats, differentiable w.r.t. `logits` (this rank's slice of the gradient).
    """
    shard = _shard_of(logits, tp_group)
    _check_options(chunk_size, temperature)
    flat = logits.reshape(-1, shard.v_local)  # (N, V_local)
    return _Entropy.apply(flat, shard, chunk_size, float(temperature)).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------- top-k


def _sort_desc_low_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of (values, ids) (n, c) by value descending, equal values by id ascending."""
    order = ids.argsort(dim=-1, stable=True)
    values, ids = values.gather(1, order), ids.gather(1, order)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, order), ids.gather(1, order)


def _local_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of z (n, V) with ties at the k-th value going to the lowest column index.

    `torch.topk` picks arbitrarily among equal values at the boundary, so we take its k-th value as a threshold and
    choose the columns strictly above it plus the lowest-index columns equal to it. Returns (n, k) values, columns.
    """
    n = z.shape[0]
    kth = z.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # (n, 1) k-th largest value
    above = z > kth  # (n, V)
    need = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)  # (n, 1) how many ties at kth to take, >= 1
    at = z == kth
    chosen = above | (at & (at.cumsum(dim=-1, dtype=torch.int32) <= need))  # exactly k per row unless NaN
    cols = chosen.nonzero()[:, 1]  # row-major: ascending columns within each row
    if cols.numel() != n * k:
        raise S2DError("logits: contain NaN; top-k log-probs are undefined")
    cols = cols.view(n, k)
    return _sort_desc_low_id(z.gather(1, cols), cols)


@torch.no_grad()
def topk_logprobs(
    logits: torch.Tensor,
    k: int,
    tp_group=None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens and their log-probs under softmax(logits / temperature), from a vocab shard.

    Each rank takes the top-k of its shard, the K candidates (values, global ids) of every rank are all-gathered,
    and the top-k of the K * tp candidates is kept. Equal logits are ordered by the lower token id.

    Args:
        logits: (B, T, V_local) this rank's vocab shard (any leading shape works).
        k: 1 <= k <= full vocab size.
        tp_group, chunk_size, temperature: as in :func:`token_logprobs`.

    Returns:
        values (B, T, K) fp32 log-probs, descending; ids (B, T, K) int64 global token ids. Not differentiable.
    """
    shard = _shard_of(logits, tp_group)
    _check_options(chunk_size, temperature)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= shard.vocab_size:
        raise S2DError(f"k: expected an int in [1, {shard.vocab_size}] (the full vocab size), got {k!r}")
    k_local = min(k, shard.v_local)
    flat = logits.reshape(-1, shard.v_local)  # (N, V_local)
    cdt = _compute_dtype(logits)
    n = flat.shape[0]
    values = torch.empty(n, k, dtype=cdt, device=logits.device)  # (N, K)
    ids = torch.empty(n, k, dtype=torch.long, device=logits.device)  # (N, K)
    for rows in _row_chunks(n, chunk_size):
        z = _scaled(flat[rows], cdt, temperature)  # (n_c, V_local)
        z.sub_(_global_max(z, shard)[:, None])  # z' = z - m: exact, hence identical under any TP layout
        s = z.exp().sum(dim=-1)  # (n_c,)
        shard.all_reduce(s, dist.ReduceOp.SUM)
        cand_v, cand_i = _local_topk(z, k_local)  # (n_c, k_local)
        del z
        cand_v = shard.all_gather_cat(cand_v)  # (n_c, k_local * world)
        cand_i = shard.all_gather_cat(cand_i + shard.vocab_start)
        cand_v, cand_i = _sort_desc_low_id(cand_v, cand_i)
        values[rows] = cand_v[:, :k] - s.log()[:, None]
        ids[rows] = cand_i[:, :k]
    out_shape = (*logits.shape[:-1], k)
    return values.reshape(out_shape), ids.reshape(out_shape)
