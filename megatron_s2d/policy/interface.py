"""What a stage loop talks to: a ``Scorer`` (frozen teacher, reference) and a ``Policy`` (a scorer that trains).

    lp = teacher.logprobs(batch, temperature)                      # (N, T) log pi(token) at each target position
    s = teacher.logprobs_at(batch, temperature, tail=True)         # one pass: s.logprobs (N, T), s.at_ids (N, T, K)
                                                                   # at batch.topk_ids, s.log_tail (N, T) outside
    vals, ids = model.topk(batch, k, temperature)                  # (N, T, K) top-k log-probs and ids
    metrics = policy.train(batch, PolicyGradientLoss(...), updates=4)

Process groups, micro-batching, routing between layouts and the objectives' plumbing stay behind these methods.
Both implementations (``MegatronPolicy``, ``FrozenScorer``) get the scoring methods from :class:`ScoringMethods`,
which builds each call from one primitive, ``forward_values(tensors, objective, micro_batch_tokens)``.
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


class ScoringMethods:
    """The scoring half of the interface, for a class with ``tp_group``, ``micro_batch_tokens`` and
    ``forward_values(tensors, objective, micro_batch_tokens) -> {name: (N, T, ...)}``."""

    tp_group: object
    micro_batch_tokens: int

    def forward_values(self, batch: dict, objective, micro_batch_tokens: int) -> dict: ...

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """(N, T) log-probs of the batch's tokens at ``temperature`` (0 outside each row's targets)."""
        out = self.forward_values(batch.tensors("tokens", "lengths"), O.logprob_values(self.tp_group, temperature),
                                  self.micro_batch_tokens)
        return out["logprobs"]

    def logprobs_at(self, batch: RolloutBatch, temperature: float, tail: bool = False) -> TokenScores:
        """In one pass: the tokens' log-probs, the log-probs at ``batch.topk_ids`` (N, T, K) and, with ``tail``, the
        log of the mass outside those ids (N, T)."""
        out = self.forward_values(batch.tensors("tokens", "lengths", "topk_ids"),
                                  O.logprob_values(self.tp_group, temperature, ids_key="topk_ids", tail=tail),
                                  self.micro_batch_tokens)
        return TokenScores(out["logprobs"], out["logprobs_at_ids"], out.get("log_tail_at_ids"))

    def topk(self, batch: RolloutBatch, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, K) top-k log-probs and ids at each target position."""
        out = self.forward_values(batch.tensors("tokens", "lengths"),
                                  O.logprob_values(self.tp_group, temperature, topk=k), self.micro_batch_tokens)
        return out["topk_logprobs"], out["topk_ids"]
