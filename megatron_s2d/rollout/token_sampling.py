"""Drawing one token per row from full-vocab logits: greedy, temperature, top-k, top-p, with counter-based randomness.

Randomness is *counter-based*: the draw for response position ``t`` of a sample uses one uniform
``u = H(seed, prompt key, sample index, t)`` (a 32-bit integer hash, two lanes combined into 53 bits), turned into a
token by inverse-CDF sampling over the (truncated, renormalised) distribution. Compared with a stateful
``torch.Generator`` this makes a sample depend only on its own prompt, index and seed, not on which other rows share
its batch, how the batch was chunked (``max_batch_tokens``), when finished rows were compacted away, or the
tensor-parallel layout; and every TP rank computes the same ``u`` without communication.

Truncation order follows HF / vLLM: top-k first, then top-p on the renormalised top-k distribution (the smallest
prefix of the sorted distribution whose mass reaches ``top_p``; the most likely token is always kept).
``temperature == 0`` means greedy (argmax; ties go to the lowest token id).

All functions are pure and run on any device; hashes are computed in int64 with every product kept below 2**63.
"""

from __future__ import annotations

import zlib
from array import array

import torch

_M32 = 0xFFFFFFFF
_TWO53 = float(2**53)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), split so no intermediate exceeds 2**49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (Wellons) on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def prompt_key(index: int, prompt_ids: list[int]) -> int:
    """A 32-bit key for the prompt at ``index`` with these token ids (content and position both matter)."""
    return zlib.crc32(array("q", prompt_ids).tobytes(), zlib.crc32(index.to_bytes(8, "little"))) & _M32


def row_keys(seed: int, prompt_keys: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per generated sequence (int64 tensor (B,)) from the seed, prompt key and sample index."""
    seed %= 2**64
    h = mix32(torch.full_like(prompt_keys, (seed & _M32) ^ 0x9E3779B9))
    h = mix32(h ^ (seed >> 32))
    h = mix32(h ^ prompt_keys)
    return mix32(h ^ sample_idx)


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64 (B,)) for sequences ``keys`` (B,) at response positions ``steps`` (B,)."""
    a = mix32(mix32(keys ^ 0x243F6A88) ^ steps)
    b = mix32(mix32(keys ^ 0x85A308D3) ^ steps)
    return ((a >> 11) * 2**32 + b).to(torch.float64) / _TWO53


def sample_tokens(
    logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Draw one token per row.

    Args:
        logits: (B, V) full-vocab logits (any float dtype; computed in fp32).
        u: (B,) uniforms in [0, 1) (ignored when greedy).
        temperature: 0 = greedy; otherwise the logits are divided by it.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1] (1 = off).

    Returns:
        (B,) int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature  # (B, V)
    idx = None
    if 0 < top_k < z.shape[-1]:
        z, idx = z.topk(top_k, dim=-1)  # (B, k) sorted descending
    elif top_p < 1.0:
        z, idx = z.sort(dim=-1, descending=True, stable=True)  # (B, V)
    probs = torch.softmax(z, dim=-1)  # (B, C) renormalised over the candidates
    if top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs  # (B, C) mass of strictly more likely candidates
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.double().cumsum(dim=-1)  # (B, C)
    target = u.to(cdf.dtype) * cdf[:, -1]  # (B,)
    pos = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # first index with cdf > target
    # u * total can round up to total: fall back to the last candidate with non-zero probability
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)  # (B,)
    pos = torch.minimum(pos, last)
    return pos if idx is None else idx.gather(1, pos[:, None]).squeeze(1)
