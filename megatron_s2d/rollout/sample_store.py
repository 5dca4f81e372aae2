"""Rollout samples on disk without pickle (the forward-KL warmup's teacher cache): safetensors + a JSON header.

    save_samples(path, per_step)            # path.safetensors + path.json; per_step: list (steps) of list[Sample]
    per_step = load_samples(path)           # the same samples, exactly (ids, fp32 log-probs, top-k, finish reasons)

Tensors are the samples' fields concatenated (prompt ids, response ids, log-probs, top-k ids and log-probs per response
token); the header holds each sample's lengths and finish reason and each step's sample count. Loading executes no
code from the file (a run folder may be shared); an older pickled ``.pt`` cache is refused, not unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_s2d.checkpoint.tensor_pair import pair_exists, read_pair, write_pair
from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.rollout.base import Sample

FORMAT = "megatron-s2d/samples/v1"


def exists(path: Path) -> bool:
    return pair_exists(path)


def save_samples(path: Path, per_step: list[list[Sample]], provenance: dict | None = None) -> None:
    """Write atomically (temp files renamed into place, the header last). ``provenance``: what the samples were
    made with (kept in the header; :func:`read_provenance`), so a reader can tell a cache it may reuse."""
    flat = [s for step in per_step for s in step]
    k = next((len(s.topk_ids[0]) for s in flat if s.topk_ids), 0)
    if any((s.topk_ids is None) != (flat[0].topk_ids is None) for s in flat):
        raise InternalError("save_samples: some samples have top-k log-probs and some do not")
    for i, s in enumerate(flat):
        n = len(s.response_ids)
        if len(s.logprobs) != n or (s.topk_ids is not None and (
                len(s.topk_ids) != n or len(s.topk_logprobs) != n
                or any(len(a) != k or len(b) != k for a, b in zip(s.topk_ids, s.topk_logprobs)))):
            raise InternalError(f"save_samples: sample {i} has {n} response tokens but {len(s.logprobs)} log-probs "
                                f"or top-k rows of another length/width than {k}")
    tensors = {
        "prompt_ids": torch.tensor([t for s in flat for t in s.prompt_ids], dtype=torch.int64),
        "response_ids": torch.tensor([t for s in flat for t in s.response_ids], dtype=torch.int64),
        "logprobs": torch.tensor([x for s in flat for x in s.logprobs], dtype=torch.float32),
    }
    has_topk = bool(flat) and flat[0].topk_ids is not None
    if has_topk:
        rows = sum(len(s.response_ids) for s in flat)
        tensors["topk_ids"] = torch.tensor([x for s in flat for row in s.topk_ids for x in row],
                                           dtype=torch.int64).reshape(rows, k)
        tensors["topk_logprobs"] = torch.tensor([x for s in flat for row in s.topk_logprobs for x in row],
                                                dtype=torch.float32).reshape(rows, k)
    header = {"format": FORMAT, "steps": [len(step) for step in per_step], "topk": k if has_topk else None,
              "samples": [[len(s.prompt_ids), len(s.response_ids), s.finish_reason] for s in flat],
              "provenance": provenance}
    write_pair(path, tensors, header)


def read_provenance(path: Path) -> dict | None:
    """The ``provenance`` a cache was saved with (None: none recorded, as an older megatron-s2d wrote it); reads
    only the JSON header."""
    header, _ = read_pair(path, FORMAT, "sample cache", fix="delete it to regenerate the samples")
    prov = header.get("provenance")
    return prov if isinstance(prov, dict) else None


def load_samples(path: Path) -> list[list[Sample]]:
    header, tensors = read_pair(path, FORMAT, "sample cache", fix="delete it to regenerate the samples")
    try:
        return _decode(header, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise S2DError(f"{path}: the header and the tensors disagree ({type(e).__name__}: {e}; a partial write?); "
                       "delete it to regenerate") from e


def _decode(header: dict, tensors: dict) -> list[list[Sample]]:
    prompts, responses = tensors["prompt_ids"].tolist(), tensors["response_ids"].tolist()
    lps = tensors["logprobs"].tolist()
    topk = header["topk"] is not None
    tids = tensors["topk_ids"].tolist() if topk else None
    tlps = tensors["topk_logprobs"].tolist() if topk else None
    flat, p, r = [], 0, 0
    for plen, rlen, reason in header["samples"]:
        flat.append(Sample(prompt_ids=prompts[p:p + plen], response_ids=responses[r:r + rlen],
                           logprobs=lps[r:r + rlen], finish_reason=reason,
                           topk_ids=tids[r:r + rlen] if topk else None,
                           topk_logprobs=tlps[r:r + rlen] if topk else None))
        p, r = p + plen, r + rlen
    if (p != len(prompts) or r != len(responses) or r != len(lps) or sum(header["steps"]) != len(flat)
            or (topk and (len(tids) != r or len(tlps) != r))):
        raise ValueError("lengths do not add up")
    out, i = [], 0
    for n in header["steps"]:
        out.append(flat[i:i + n])
        i += n
    return out
