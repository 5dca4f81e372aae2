"""Rollout samples on disk without pickle (the forward-KL warmup's teacher cache): safetensors + a JSON header.

    save_samples(path, per_step)            # path.safetensors + path.json; per_step: list (steps) of list[Sample]
    per_step = load_samples(path)           # the same samples, exactly (ids, fp32 log-probs, top-k, finish reasons)

Tensors are the samples' fields concatenated (prompt ids, response ids, log-probs, top-k ids and log-probs per response
token); the header holds each sample's lengths and finish reason and each step's sample count. Loading executes no
code from the file (a run folder may be shared); an older pickled ``.pt`` cache is refused, not unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.rollout.base import Sample

FORMAT = "megatron-s2d/samples/v1"


def _paths(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def exists(path: Path) -> bool:
    st, js = _paths(path)
    return st.is_file() and js.is_file()


def save_samples(path: Path, per_step: list[list[Sample]]) -> None:
    """Write atomically (temp files renamed into place, the header last)."""
    from safetensors.torch import save_file

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
              "samples": [[len(s.prompt_ids), len(s.response_ids), s.finish_reason] for s in flat]}
    st, js = _paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(st) + ".tmp")
    os.replace(str(st) + ".tmp", st)
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(header))
    os.replace(tmp, js)


def load_samples(path: Path) -> list[list[Sample]]:
    from safetensors.torch import load_file

    st, js = _paths(path)
    if not exists(path):
        old = Path(path).with_suffix(".pt")
        if old.is_file():
            raise S2DError(f"{old}: a pickled sample cache (an older megatron-s2d); it is not loaded, because "
                           "unpickling a file from a run folder can run code. Delete it to regenerate the samples")
        raise S2DError(f"{st}: no sample cache here")
    try:
        header = json.loads(js.read_text())
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - json, OS and safetensors errors alike: not a cache this version wrote
        raise S2DError(f"{path}: unreadable sample cache ({type(e).__name__}: {e}); delete it to regenerate") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise S2DError(f"{js}: field 'format' = {got!r}, expected {FORMAT!r}")
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
