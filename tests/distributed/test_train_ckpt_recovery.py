"""Real training checkpoints of a tiny megatron policy on 2 gloo ranks (TP2: each rank writes its own shards):

* three checkpoints with ``keep=2`` leave the newest two; each has a manifest that verifies;
* one ``.distcp`` of the newest truncated: every rank's ``resume_checkpoint`` picks the previous one (same answer on
  both ranks, no hang), names the file, sets the damaged one aside, and ``load_train_checkpoint`` restores exactly
  that checkpoint's weights, scheduler and RNG states without error;
* the stage lock taken collectively: a lock held by another process is refused on *every* rank, naming the holder.
"""

import os

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = pytest.mark.distributed

CFG = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=64)


def _policy(tp):
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy

    arch = arch_from_hf_config(CFG)
    return arch, TrainablePolicy(MegatronModel(arch, ModelConfig(tp=tp, pp=1, dtype="fp32"), seed=3),
                                 OptimConfig(lr=1e-2), total_updates=8)


def _train_step(pol, step):
    from megatron.core import parallel_state as ps

    from megatron_s2d.policy import objectives as O

    g = torch.Generator().manual_seed(step)
    n, t = 4, 16
    tokens = torch.randint(0, 128, (n, t), generator=g)
    mask = torch.zeros(n, t)
    mask[:, 4:] = 1
    batch = dict(tokens=tokens, lengths=torch.full((n,), t), loss_mask=mask)
    tp_group = ps.get_tensor_model_parallel_group()
    batch["old_logprobs"] = pol.forward_values(batch, O.logprob_values(tp_group, 1.0), 64)["logprobs"]
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    obj = O.policy_gradient(tp_group, O.Normalisers(float(mask.sum()), float(n)), eps_low=0.2, eps_high=0.28,
                            temperature=1.0)
    pol.train_step(batch, obj, 64)


def _weights(pol):
    return {k: v.detach().clone() for k, v in pol.module.state_dict().items() if torch.is_tensor(v)}


def _job(rank, world, root):
    from pathlib import Path

    from megatron_s2d.checkpoint.manifest import verify_manifest
    from megatron_s2d.checkpoint.model_ckpt import write_model_meta
    from megatron_s2d.checkpoint.train_ckpt import (complete_checkpoints, latest_checkpoint, load_train_checkpoint,
                                                    resume_checkpoint, save_train_checkpoint)
    from megatron_s2d.runtime.dist import init_distributed

    root = Path(root)
    init_distributed(world, 1, seed=3)
    arch, pol = _policy(world)
    saved = {}
    for step in (1, 2, 3):
        _train_step(pol, step)
        torch.manual_seed(100 + step)  # distinct RNG state per checkpoint
        saved[step] = (_weights(pol), torch.get_rng_state(), pol.scheduler.state_dict())
        save_train_checkpoint(pol, root, step, {"ledger": {}, "stage": "t"},
                              lambda d: write_model_meta(d, arch, "fp32", {"tp": world, "pp": 1}), keep=2)
    names = [p.name for p in complete_checkpoints(root)]
    assert names == ["step_000003", "step_000002"], names
    assert verify_manifest(root / "step_000003") == []
    torch.distributed.barrier()
    if rank == 0:  # damage the newest: truncate the shard written by rank 1
        victim = root / "step_000003" / "model" / "__1_0.distcp"
        victim.write_bytes(victim.read_bytes()[:64])
    torch.distributed.barrier()
    for _ in range(2):  # keep training on: the weights now differ from every checkpoint
        _train_step(pol, 9)
    lines = []
    chosen = resume_checkpoint(root, log=lines.append)
    state = load_train_checkpoint(pol, chosen)
    weights, rng, sched = saved[2]
    now = _weights(pol)
    same = all(torch.equal(now[k], weights[k]) for k in weights)
    return {"chosen": str(chosen), "log": "\n".join(lines), "step": state["step"], "same_weights": same,
            "same_rng": torch.equal(torch.get_rng_state(), rng),
            "same_sched": pol.scheduler.state_dict() == sched,
            "latest": str(latest_checkpoint(root)), "aside": (root / "step_000003.damaged").is_dir()}


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    outs = run_distributed(_job, world_size=2, timeout=300, root=str(root))
    for rank, out in enumerate(outs):
        assert out["chosen"] == str(root / "step_000002"), (rank, out["log"])
        assert out["step"] == 2 and out["same_weights"] and out["same_rng"] and out["same_sched"], (rank, out)
        assert out["latest"] == str(root / "step_000002") and out["aside"]
    damaged = root / "step_000003" / "model" / "__1_0.distcp"
    assert f"checkpoint {root / 'step_000003'} is damaged" in outs[0]["log"]
    assert f"{damaged}: 64 bytes, the manifest says" in outs[0]["log"]


def _lock_job(rank, world, lock):
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.runtime.locks import LockHeld, hold_lock_collective

    init_distributed(1, 1)
    try:
        with hold_lock_collective(lock, "stage 't'"):
            return "held"
    except LockHeld as e:
        torch.distributed.barrier()  # every rank got here: nobody is stuck in a collective
        return str(e)


def test_stage_lock_refusal_reaches_every_rank(tmp_path):
    from megatron_s2d.runtime.locks import hold_lock

    lock = tmp_path / "stages" / "t" / "LOCK"
    with hold_lock(lock, "stage 't'"):
        outs = run_distributed(_lock_job, world_size=2, timeout=120, lock=str(lock))
    assert all(f"stage 't' is in use by pid {os.getpid()}" in o for o in outs), outs
    assert run_distributed(_lock_job, world_size=2, timeout=120, lock=str(lock)) == ["held", "held"]
