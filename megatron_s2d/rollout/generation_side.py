"""What a generation rank of a separate stage holds (``rollout.placement: separate``, ``rollout.remote.serve``): the
generating model, which the weight transfer writes into, and the engine that samples from it.

    side = build_side(hello, seed)              # collective over the generation ranks' own world
    transfer.run(side.model.module, version)    # M-to-N, into the megatron model at the generators' layout
    side.weights_arrived()                      # vLLM: the sharded refit from that model (+ verify_sync)
    side.generate(prompts, params)              # on this rank's replica, for the requests ``side.serves(d)``

* ``megatron``: the KV-cached sampler runs on the model itself (any tp/pp): nothing to do when weights arrive.
* ``vllm``: one vLLM worker per rank (``distributed_executor_backend="external_launcher"``) on the generators' own
  world, ``N / tp`` replicas of ``tp`` contiguous ranks; the megatron model at (vLLM tp, pp 1) is the transfer's
  destination and the refit's source: the same sharded refit as a colocated engine (``rollout.sharded_refit``, local
  slices at equal tp, nothing gathered). It costs a second copy of the weights per rank (1/tp of the model in its
  dtype, counted by ``models.memory.estimate_generation_memory``); writing the transfer straight into vLLM's
  parameters (NeMo-RL's ``update_weights_from_collective``, nemo_rl/models/generation/vllm/vllm_backend.py) would
  save it, and needs vLLM's own loaders as the transfer's destination layout.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def _rank_env(rank: int):
    """vLLM's external launcher reads the worker's rank from ``RANK`` (vllm 0.32 v1/executor/uniproc_executor.py:
    186-197) and then uses the default process group it finds (distributed/parallel_state.py:1905, 1986-1988): on a
    generation rank that is the generators' own world (``runtime.bridge.split_world``), where this rank is
    ``torch.distributed.get_rank()``, not its global rank. ``LOCAL_RANK`` (the device) stays."""
    old = os.environ.get("RANK")
    os.environ["RANK"] = str(rank)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RANK", None)
        else:
            os.environ["RANK"] = old


@dataclass
class GenerationSide:
    """One generation rank: ``model`` (the transfer's destination), ``engine`` (generates), which replica it is in,
    and whether it reports its replica's samples."""

    model: object  # policy.model.MegatronModel at the generators' layout
    engine: object  # MegatronSampler or VLLMEngine
    replica: int
    replicas: int
    reports: bool
    vllm: bool
    verify: bool

    def serves(self, dp_rank: int) -> bool:
        """Whether this rank's replica generates the requests of trainer data-parallel rank ``dp_rank``."""
        return dp_rank % self.replicas == self.replica

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def weights_arrived(self) -> dict[str, float]:
        """After a transfer (or a frozen model's load): vLLM takes the model's weights (collective over the
        generators). Returns the refit's figures (empty for the megatron sampler, which runs on the model itself)."""
        if not self.vllm:
            return {}
        t0 = time.perf_counter()
        out = self.engine.refit(self.model)
        if self.verify:
            out["sync_max_logprob_diff"] = self.engine.check_sync(self.model)
        out["vllm_load_s"] = time.perf_counter() - t0
        return out

    def close(self) -> None:
        if self.vllm:
            self.engine.close()


def build_side(hello, seed: int) -> GenerationSide:
    """The generating model at ``hello.model_cfg``'s layout on the generators' world and its engine (collective).
    A frozen model (a teacher) is loaded from its checkpoint, and vLLM takes its weights at once; the policy's weights
    arrive by transfer before the first request."""
    import torch.distributed as dist

    from megatron_s2d.policy.load import load_model
    from megatron_s2d.rollout.factory import make_sampler
    from megatron_s2d.runtime.dist import init_distributed

    mcfg = hello.model_cfg
    info = init_distributed(mcfg.tp, mcfg.pp, seed=seed)
    loaded = load_model(hello.checkpoint, mcfg, seed=seed, weights=hello.frozen)
    if hello.engine == "megatron":
        sampler = make_sampler(loaded.model, stop_ids=hello.stop_ids, pad_id=hello.pad_id,
                               max_batch_tokens=hello.max_batch_tokens)
        return GenerationSide(model=loaded.model, engine=sampler, replica=info.dp_rank, replicas=info.dp,
                              reports=info.tp_rank == 0 and info.pp_rank == 0, vllm=False, verify=False)
    from megatron_s2d.rollout.factory import vllm_engine
    from megatron_s2d.rollout.sharded_refit import GenerationLayout

    layout = GenerationLayout(tp=mcfg.tp, world=dist.get_world_size(), rank=dist.get_rank())
    with _rank_env(dist.get_rank()):
        engine = vllm_engine(Path(hello.checkpoint), layout, Path(hello.work_dir), hello.stop_ids, hello.vllm, seed,
                             hello.max_model_len, hello.gpu_memory_utilization)
    side = GenerationSide(model=loaded.model, engine=engine, replica=layout.dp_rank, replicas=layout.dp,
                          reports=layout.tp_rank == 0, vllm=True, verify=hello.verify)
    if hello.frozen:
        side.weights_arrived()
    return side
