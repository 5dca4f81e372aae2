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

from megatron_s2d.errors import S2DError
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
        raise S2DError("save_samples: some samples have top-k log-probs and some do not")
    tensors = {
        "prompt_ids": torch.tensor([t for s in flat for t in s.prompt_ids], dtype=torch.int64),
        "response_ids": torch.tensor([t for s in flat for t in s.response_ids], dtype=torch.int64),
        "logprobs": torch.tensor([x for s in flat for x in s.logprobs], dtype=torch.float32),
    }
    has_topk = bool(flat) and flat[0].topk_ids is not None
    if has_topk:
        tensors["topk_ids"] = torch.tensor([row for s in flat for row in s.topk_ids], dtype=torch.int64).view(-1, k)
        tensors["topk_logprobs"] = torch.tensor([row for s in flat for row in s.topk_logprobs],
                                                dtype=torch.float32).view(-1, k)
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
    except (json.JSONDecodeError, OSError, ValueError, RuntimeError) as e:
        raise S2DError(f"{path}: unreadable sample cache ({e}); delete it to regenerate") from e
    if header.get("format") != FORMAT:
        raise S2DError(f"{js}: field 'format' = {header.get('format')!r}, expected {FORMAT!r}")
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
    if p != len(prompts) or r != len(responses) or sum(header["steps"]) != len(flat):
        raise S2DError(f"{path}: the header and the tensors disagree (a partial write?); delete it to regenerate")
    out, i = [], 0
    for n in header["steps"]:
        out.append(flat[i:i + n])
        i += n
    return out
