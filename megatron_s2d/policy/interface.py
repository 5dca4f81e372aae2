"""What a stage loop talks to: a ``Scorer`` (frozen teacher, reference) and a ``Policy`` (a scorer that trains).

    lp = teacher.logprobs(batch, temperature)                      # (N, T) log pi(token) at each target position
    s = teacher.logprobs_at(batch, temperature, tail=True)         # one pass: s.logprobs (N, T), s.at_ids (N, T, K)
                                                                   # at batch.topk_ids, s.log_tail (N, T) outside
    vals, ids = model.topk(batch, k, temperature)                  # (N, T, K) top-k log-probs and ids
    metrics = policy.train(batch, PolicyGradientLoss(...), updates=4)

Process groups, micro-batching, routing between layouts and the objectives' plumbing stay behind these methods.
The implementations: ``policy.model.MegatronModel`` (a frozen model: a ``Scorer``), ``policy.scorer.RoutedScorer``
(a frozen model at a layout of its own, serving the job's data-parallel ranks: a ``Scorer``) and
``policy.trainer.TrainablePolicy`` (a ``Policy``). All three get the scoring methods from
``policy.scoring.ScoringMethods``, which builds each call from one primitive,
``forward_values(tensors, objective, micro_batch_tokens)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.batch import RolloutBatch


@dataclass(frozen=True)
class TokenScores:
    logprobs: torch.Tensor  # (N, T) log pi(token) at each target position
    at_ids: torch.Tensor  # (N, T, K) log pi(v) for the ids batch.topk_ids
    log_tail: torch.Tensor | None = None  # (N, T) log of pi's mass outside those ids


class Scorer(Protocol):
    micro_batch_tokens: int

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor: ...

    def logprobs_at(self, batch: RolloutBatch, temperature: float, tail: bool = False) -> TokenScores: ...

    def topk(self, batch: RolloutBatch, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]: ...


class Policy(Scorer, Protocol):
    def train(self, batch: RolloutBatch, loss: O.Loss, updates: int) -> dict[str, float]: ...
