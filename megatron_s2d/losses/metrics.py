"""How to combine and normalise the metric dicts returned by the losses.

Every loss returns `(loss, metrics)`; `metrics` holds detached fp32 scalars for ONE micro-batch on ONE rank.
Naming convention (it fixes both the reduction across micro-batches / ranks and the final normalisation):

  key suffix     combine over micro-batches and DP ranks     final value (`finalize_metrics`)
  `token_count`  sum                                          kept (global number of loss tokens)
  `seq_count`    sum                                          kept (sequences with >= 1 loss token)
  `*_sum`        sum                                          `*_mean`  = value / token_count  (per-token mean)
  `*_count`      sum                                          `*_frac`  = value / token_count  (token fraction)
  `*_max`        max                                          kept
  `*_min`        min                                          kept

All `_sum`/`_count` metrics are per-token quantities, so `token_count` is always their denominator.

Example (caller side, one step):
    totals = {}
    for mb in micro_batches:
        loss, m = clipped_pg_loss(...); loss.backward(); totals = merge_metrics(totals, m)
    # all-reduce each entry with metric_reduce_op(name) across DP ranks, then:
    logged = finalize_metrics(totals)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_s2d.errors import S2DError

_KEPT = ("token_count", "seq_count")


def metric_reduce_op(name: str) -> str:
    """'sum', 'max' or 'min': how metric `name` combines across micro-batches and ranks."""
    if name.endswith("_max"):
        return "max"
    if name.endswith("_min"):
        return "min"
    if name in _KEPT or name.endswith("_sum") or name.endswith("_count"):
        return "sum"
    raise S2DError(f"metric {name!r}: unknown suffix (expected _sum, _count, _max or _min)")


def merge_metrics(
    acc: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Combine two metric dicts (e.g. two micro-batches) with each key's reduce op; keys may differ."""
    out = dict(acc)
    for name, value in new.items():
        if name not in out:
            out[name] = value
            continue
        op = metric_reduce_op(name)
        if op == "sum":
            out[name] = out[name] + value
        elif op == "max":
            out[name] = torch.maximum(out[name], value)
        else:
            out[name] = torch.minimum(out[name], value)
    return out


def finalize_metrics(totals: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Turn globally reduced totals into loggable floats (see the table in the module docstring)."""
    if "token_count" not in totals:
        raise S2DError("metrics: 'token_count' missing, cannot normalise per-token sums")
    n_tokens = float(totals["token_count"])
    denom = max(n_tokens, 1.0)
    out: dict[str, float] = {}
    for name, value in totals.items():
        value = float(value)
        if name in _KEPT or metric_reduce_op(name) != "sum":
            out[name] = value
        elif name.endswith("_sum"):
            out[name[: -len("_sum")] + "_mean"] = value / denom
        else:
            out[name[: -len("_count")] + "_frac"] = value / denom
    if "clip_low_frac" in out:  # the clipped surrogate's two sides, together
        out["clip_frac"] = out["clip_low_frac"] + out.get("clip_high_frac", 0.0)
    return out
