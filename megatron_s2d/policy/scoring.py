"""The scoring half of the ``Scorer`` interface (``policy.interface``), built on one primitive.

A class with ``tp_group``, ``micro_batch_tokens`` and ``forward_values(tensors, objective, micro_batch_tokens) ->
{name: (N, T, ...)}`` gets ``logprobs``, ``logprobs_at`` and ``topk`` from :class:`ScoringMethods`.
"""

from __future__ import annotations

import torch

from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.policy.interface import TokenScores


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
