"""Build the rollout engine for a model, from explicit arguments (no stage object reaches down here).

    engine = make_engine("vllm", loaded, dp_rank=r, work_dir=..., stop_ids=(7,), pad_id=0, vllm=cfg, seed=1,
                         trainer=policy, max_model_len=1024 + 8192)      # loaded: policy.load.LoadedModel
    samples = engine.generate(prompts, params); ...train...; engine.sync_weights(policy)   # refit at the next generate

Every engine comes wrapped in ``colocation.ColocatedEngine``: the memory phases around each generation (the trainer's
grads and optimizer state off the device, vLLM woken, refit lazily, put back to sleep).

* ``"megatron"``: the KV-cached sampler on the live model (any TP/PP layout; nothing to sync). A frozen model in a
  layout of its own is wrapped in ``RoutedEngine`` (its replicas serve the stage's data-parallel ranks).
* ``"vllm"``: vLLM colocated in the job's processes (``distributed_executor_backend="external_launcher"``), for any
  training layout: ``world / vllm.tp`` replicas of ``vllm.tp`` contiguous ranks, every vLLM rank holding all layers
  (``sharded_refit.GenerationLayout``). The engine starts from a config-only HF folder with dummy weights and takes the
  model's weights by a sharded refit at once (no full HF export on disk, no rank holding a full model copy). When the
  replicas are not exactly the trainer's data-parallel groups (PP models, vLLM tp != training tp, a teacher at its own
  layout), ``RoutedEngine`` splits the prompts of all data-parallel ranks over the replicas and sends samples back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from megatron_s2d.errors import InternalError


def make_sampler(model, *, stop_ids: tuple[int, ...], pad_id: int, max_batch_tokens: int | str = "auto"):
    """The KV-cached megatron sampler on ``model`` (a ``policy.model.MegatronModel``, at any layout): the one place
    that builds it for a stage, an evaluation or ``s2d eval``."""
    from megatron_s2d.rollout.megatron_sampler import MegatronSampler

    return MegatronSampler(model.module, model.arch, tp_group=model.tp_group, eos_token_ids=list(stop_ids),
                           pad_token_id=pad_id, max_batch_tokens=max_batch_tokens)


def make_engine(engine: str, loaded, *, dp_rank: int, work_dir: Path, stop_ids: tuple[int, ...], pad_id: int,
                vllm=None, seed: int = 0, shield=contextlib.nullcontext, trainer=None, max_model_len: int | None = None,
                gpu_memory_utilization: float | None = None, trace: list[str] | None = None,
                max_batch_tokens: int | str = "auto"):
    """The rollout engine generating with ``loaded.model`` (``policy.load.LoadedModel``: the policy's model, or a
    frozen teacher at its own layout; its config is read from ``loaded.path``), as a ``colocation.ColocatedEngine``.
    ``dp_rank``: this rank's data-parallel rank in the job (whose prompts it asks for). ``shield``: a context manager
    to start child processes in (preemption signals). ``trainer``: the job's ``TrainablePolicy`` (the model itself,
    or the student while a teacher generates): its grads and optimizer state leave the device while the engine
    generates. ``max_model_len``: the longest prompt + response (vLLM checks at start-up that one such sequence fits
    its KV cache; None: the model's max_position_embeddings). ``gpu_memory_utilization``: vLLM's share of the GPU
    (``models.memory.vllm_memory_fraction``; None: vLLM's default). ``trace``: a list the memory phases are appended
    to (tests). ``max_batch_tokens``: the megatron sampler's KV budget per chunk (the plan's
    ``rollout.max_batch_tokens``; "auto": sized from free GPU memory)."""
    from megatron_s2d.rollout.colocation import ColocatedEngine, TrainerMemory, note, offloaded
    from megatron_s2d.rollout.routed import RoutedEngine

    memory = TrainerMemory(trainer) if trainer is not None else None
    model, groups = loaded.model, loaded.groups
    if engine == "megatron":
        out = make_sampler(model, stop_ids=stop_ids, pad_id=pad_id, max_batch_tokens=max_batch_tokens)
        out = out if groups.is_global else RoutedEngine(out, groups, dp_rank)
        return ColocatedEngine(out, trainer=memory, trace=trace)
    if engine != "vllm":
        raise InternalError(f"make_engine: unknown engine {engine!r} (the stage resolves 'auto')")
    from megatron_s2d.rollout.sharded_refit import GenerationLayout

    layout = GenerationLayout(tp=vllm.tp or groups.tp, world=dist.get_world_size(), rank=dist.get_rank())
    # vLLM sizes its KV cache from the memory free at start-up and refuses to start below its share
    # (v1/worker/utils.py:716-772): start it as every later wake-up finds the device, the trainer offloaded
    with offloaded(memory, trace):
        with shield():
            out = vllm_engine(loaded.path, layout, work_dir, stop_ids, vllm, seed, max_model_len,
                               gpu_memory_utilization)
        note(trace, "start")
        out.sleep()  # until the first generation wakes it and refits (its weights are dummy until then)
        note(trace, "sleep")
    # vLLM replica r is the model's data-parallel group r on every rank (each rank generates its own group's
    # prompts, no routing) only at the job's own layout, the same tp and no pipeline stages
    own_groups = groups.is_global and layout.tp == groups.tp and groups.pp == 1
    generator = out if own_groups else RoutedEngine(out, layout, dp_rank)
    return ColocatedEngine(generator, vllm=out, trainer=memory, source=model, trace=trace)


def vllm_engine(ckpt_dir: Path, layout, work_dir: Path, stop_ids, vllm, seed: int, max_model_len: int | None,
                gpu_memory_utilization: float | None):
    """A vLLM engine for the model of ``ckpt_dir`` at ``layout`` (``sharded_refit.GenerationLayout`` over the
    current default world: the job's, or a separate stage's generation ranks), started from a config-only HF folder
    with dummy weights (collective): its first refit gives it the model's weights."""
    from megatron_s2d.checkpoint.model_ckpt import read_model_meta
    from megatron_s2d.models import llama, qwen3
    from megatron_s2d.rollout.vllm_engine import VLLMEngine

    arch, meta = read_model_meta(ckpt_dir)
    tag = hashlib.sha256(str(Path(ckpt_dir).resolve()).encode()).hexdigest()[:8]
    hf_dir = Path(work_dir) / f"vllm_config_{Path(ckpt_dir).name}_{tag}"  # config only: weights come by refit
    if dist.get_rank() == 0 and not (hf_dir / "config.json").is_file():
        hf_dir.mkdir(parents=True, exist_ok=True)
        writer = {"llama": llama, "qwen3": qwen3}[arch.model_type]
        cfg = writer.hf_config(arch, meta["dtype"])
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    dist.barrier()
    # the model's weights (a resumed policy, a trained teacher) replace the dummy ones at the first generation
    if gpu_memory_utilization is None:
        gpu_memory_utilization = vllm.gpu_memory_utilization  # a caller without the estimate: the plan's, if set
    return VLLMEngine(str(hf_dir), gpu_memory_utilization=gpu_memory_utilization,
                      cpu_kvcache_gib=vllm.cpu_kvcache_gib, seed=seed, eos_token_ids=list(stop_ids), layout=layout,
                      dtype={"fp32": "float32", "bf16": "bfloat16"}[meta["dtype"]],  # vLLM's "auto" is bf16 on CPU
                      max_model_len=max_model_len, enforce_eager=vllm.enforce_eager,
                      seed_per_request=vllm.seed_per_request, dummy_weights=True, sleep_mode=vllm.sleep,
                      verify_sync=vllm.verify_sync, verify_atol=1e-4 if meta["dtype"] == "fp32" else 5e-2)
