"""Generation in a layout other than the trainer's data parallelism: a model at its own layout (the teacher writing
the forward-KL warmup's rollouts) or vLLM replicas that span several data-parallel ranks, or only part of one.

The stage's data-parallel ranks each hold their own prompts, but a teacher replica (tp * pp ranks) may span
several of them, and every rank of a replica must run the same generation (each decode step is a collective).
So, per ``generate`` call: the prompts of all stage DP ranks are pooled in (dp rank, prompt) order, cut into
contiguous pieces of about equal token budget, one per teacher replica; each replica generates its piece; the
replica's leader sends every rank the samples of its own prompts. Same protocol and result as the wrapped engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import torch.distributed as dist

from megatron_s2d.errors import InternalError
from megatron_s2d.runtime.routing import Routing
from megatron_s2d.rollout.base import GenerationResult, SamplingParams, generation_metrics
from megatron_s2d.runtime.exchange import exchange


def _check_params_agree(params_by_source: dict[int, SamplingParams]) -> None:
    """All stage DP ranks must ask for the same sampling params; only the seed may differ."""
    first = min(params_by_source)
    base = params_by_source[first]
    for s, p in params_by_source.items():
        if dataclasses.replace(p, seed=base.seed) != base:
            raise InternalError(f"routed generation: stage data-parallel ranks {first} and {s} asked for different "
                           f"sampling params ({base} vs {p}); only the seed may differ")


def _replica_params(params_by_source: dict[int, SamplingParams], replica: int) -> SamplingParams:
    """One SamplingParams for a replica that serves several sources (params agree: ``_check_params_agree``); the
    seed is derived from every source's seed and the replica index (the same on all ranks of the replica)."""
    base = params_by_source[min(params_by_source)]
    key = f"{sorted((s, p.seed) for s, p in params_by_source.items())}:{replica}".encode()
    return dataclasses.replace(base, seed=int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))


class RoutedEngine:
    """Wraps a ``RolloutEngine`` running on a model with its own ``runtime.groups.ModelGroups``."""

    def __init__(self, engine, groups, stage_dp_rank: int):
        self.engine, self.groups, self.stage_dp_rank = engine, groups, stage_dp_rank

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        g, me = self.groups, dist.get_rank()
        start = time.perf_counter()
        announced: list = [None] * dist.get_world_size()
        budget = [len(p) + params.max_new_tokens for p in prompts]
        dist.all_gather_object(announced, (self.stage_dp_rank, budget, prompts, params))
        # every check runs on every rank on the same gathered data, so all ranks fail together (no rank is left
        # waiting in a collective)
        route = Routing.plan([(s, b, p) for s, b, p, _ in announced], g.dp, what="routed generation")
        by_source = {s: announced[r][3] for s, r in route.source.items()}
        _check_params_agree(by_source)
        piece = route.pieces[g.dp_rank]
        send = {}
        if piece:
            sources = sorted({s for s, _ in piece})
            rp = _replica_params({s: by_source[s] for s in sources}, g.dp_rank)
            result = self.engine.generate([announced[route.source[s]][2][i] for s, i in piece], rp)
            if me == g.replica_leader:
                back: dict[int, list] = {}
                for (s, i), samples in zip(piece, result.samples):
                    back.setdefault(s, []).append((i, samples))
                send = route.to_ranks(back)
        got = exchange(send)
        samples: list = [None] * len(prompts)
        for items in got.values():
            for i, group in items:
                samples[i] = group
        missing = [i for i, s in enumerate(samples) if s is None]
        if missing:
            raise InternalError(f"routed generation: no samples came back for prompts {missing[:8]} of this rank")
        return GenerationResult(samples=samples, metrics=generation_metrics(samples, time.perf_counter() - start))

    def sync_weights(self, policy) -> dict[str, float]:
        return self.engine.sync_weights(policy)

    def sleep(self) -> None:
        self.engine.sleep()

    def close(self) -> None:
        self.engine.close()
