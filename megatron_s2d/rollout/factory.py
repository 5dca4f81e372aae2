"""Build the vLLM rollout engine for a stage: export the stage's starting weights to an HF folder once (vLLM loads
a model from disk at start-up), then keep it in sync with the live policy by in-memory refits.

Wired for policies at tp = pp = 1: one engine per data-parallel rank, on that rank's device. A TP/PP policy with
a vLLM engine owned by one rank per group (export gathered over TP/PP, samples broadcast back) is the next step;
until then such a plan is refused with a message, and the megatron engine serves TP policies.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from megatron_s2d.errors import S2DError


def make_vllm_engine(ctx, policy, ckpt_dir):
    """A vLLM engine on this rank serving ``policy`` (whose weights were loaded from ``ckpt_dir``)."""
    from checkpoints_convert.megatron_to_hf import convert_megatron_to_hf

    from megatron_s2d.rollout.refit import refit_from_policy
    from megatron_s2d.rollout.vllm_engine import VLLMEngine

    groups = getattr(policy, "groups", None)  # a frozen teacher in its own layout
    tp, pp = (groups.tp, groups.pp) if groups is not None else (ctx.dist.tp, ctx.dist.pp)
    if tp > 1 or pp > 1:
        raise S2DError(f"stages.{ctx.stage.name}.rollout.engine = 'vllm' with a tp={tp} / pp={pp} model "
                       "is not wired yet in this release: use tp = pp = 1 for vLLM rollouts, or the megatron "
                       "engine (TP)")
    tag = hashlib.sha256(str(Path(ckpt_dir).resolve()).encode()).hexdigest()[:8]
    hf_dir = ctx.dir / f"vllm_hf_{Path(ckpt_dir).name}_{tag}"  # one export per served checkpoint
    if ctx.dist.is_main and not (hf_dir / "config.json").is_file():
        convert_megatron_to_hf(ckpt_dir, hf_dir, overwrite=True)
    torch.distributed.barrier()
    r = ctx.stage.rollout
    engine = VLLMEngine(str(hf_dir), gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                        cpu_kvcache_gib=r.vllm_cpu_kvcache_gib, seed=ctx.plan.seed,
                        eos_token_ids=list(ctx.stop_ids))
    refit_from_policy(engine, policy.module, policy.arch)  # a resumed policy differs from the exported weights
    return engine
