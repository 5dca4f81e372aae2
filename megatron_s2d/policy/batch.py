"""The typed batch a stage hands its models: token sequences, where the loss applies, and what each loss reads.

Layout (``N`` sequences, right-padded to ``T``): per-token fields sit at the position of the token they are about
(position ``p + i`` for response token ``i`` of a prompt of length ``p``; position 0 is never a target), matching
``policy.objectives``. The engine fields come from the rollout engine; the stage fills the loss fields it needs:

    field                     shape       set by                     read by
    tokens, lengths           (N,T) (N,)  rollout                    every model call
    loss_mask                 (N,T)       rollout (response tokens)  every loss
    engine_logprobs           (N,T)       rollout                    mismatch metrics, IS corrections
    topk_ids, topk_logprobs   (N,T,K)     rollout (the generating    warmup: the teacher's top-k (forward KL);
                                          engine's top-k at T)       opd top-k: the student's ids (reverse KL)
    old_logprobs              (N,T)       stage: policy at T         the clipped policy gradient
    advantages                (N,) (N,T)  stage                      the clipped policy gradient
    ref_logprobs              (N,T)       stage: reference at T      GRPO's k3 KL penalty
    teacher_logprobs_at_ids   (N,T,K)     stage: teacher at topk_ids the top-k reverse KL
    teacher_log_tail          (N,T)       stage: teacher's mass      the top-k reverse KL
                                          outside topk_ids
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_s2d.errors import InternalError


@dataclass(frozen=True)
class RolloutBatch:
    tokens: torch.Tensor  # (N, T) long
    lengths: torch.Tensor  # (N,) long: prompt + response tokens of each row
    loss_mask: torch.Tensor  # (N, T) float: 1 at response tokens
    engine_logprobs: torch.Tensor  # (N, T) log-probs the engine recorded when sampling (at the rollout temperature)
    topk_ids: torch.Tensor | None = None  # (N, T, K) long
    topk_logprobs: torch.Tensor | None = None  # (N, T, K)
    old_logprobs: torch.Tensor | None = None  # (N, T)
    advantages: torch.Tensor | None = None  # (N,) per sequence or (N, T) per token
    ref_logprobs: torch.Tensor | None = None  # (N, T)
    teacher_logprobs_at_ids: torch.Tensor | None = None  # (N, T, K)
    teacher_log_tail: torch.Tensor | None = None  # (N, T)

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def with_(self, **fields) -> "RolloutBatch":
        """A copy with ``fields`` set (the loss inputs a stage computes)."""
        return dataclasses.replace(self, **fields)

    def rows(self, idx: list[int]) -> "RolloutBatch":
        """The rows ``idx`` (every field; may be empty)."""
        sel = torch.tensor(idx, dtype=torch.long)
        return RolloutBatch(**{k: (None if v is None else v.index_select(0, sel.to(v.device)))
                               for k, v in self._fields().items()})

    def tensors(self, *names: str) -> dict[str, torch.Tensor]:
        """The set fields as the dict the objectives read (all of them, or ``names``; a missing one is our bug)."""
        fields = self._fields()
        if not names:
            return {k: v for k, v in fields.items() if v is not None}
        missing = [n for n in names if fields.get(n) is None]
        if missing:
            raise InternalError(f"RolloutBatch: a loss needs {missing}, which the stage did not set")
        return {n: fields[n] for n in names}

    def _fields(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def masked_mean(self, values: torch.Tensor) -> float:
        """Mean of (N, T) ``values`` over the loss tokens (0 when there are none)."""
        m = self.loss_mask
        return float((values * m).sum() / m.sum().clamp(min=1))

    @staticmethod
    def from_rows(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]], pad_id: int,
                  topk_ids: list | None = None, topk_logprobs: list | None = None) -> "RolloutBatch":
        """Right-padded tensors from per-row prompt ids, response ids and per-response-token log-probs (and top-k)."""
        n = len(prompts)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        t = max(lengths) if lengths else 1
        tokens = torch.full((n, t), pad_id, dtype=torch.long)
        mask = torch.zeros(n, t)
        engine_lp = torch.zeros(n, t)
        k = 0
        if topk_ids is not None:
            k = next((len(r[0]) for r in topk_ids if r), 0)
            ids_t = torch.zeros(n, t, max(k, 1), dtype=torch.long)
            lps_t = torch.zeros(n, t, max(k, 1))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            if r:
                a, b = len(p), len(p) + len(r)
                tokens[i, a:b] = torch.tensor(r, dtype=torch.long)
                mask[i, a:b] = 1.0
                engine_lp[i, a:b] = torch.tensor(logprobs[i], dtype=torch.float32)
                if topk_ids is not None and topk_ids[i]:
                    ids_t[i, a:b] = torch.tensor(topk_ids[i], dtype=torch.long)
                    lps_t[i, a:b] = torch.tensor(topk_logprobs[i], dtype=torch.float32)
        extra = dict(topk_ids=ids_t, topk_logprobs=lps_t) if topk_ids is not None else {}
        return RolloutBatch(tokens=tokens, lengths=torch.tensor(lengths, dtype=torch.long), loss_mask=mask,
                            engine_logprobs=engine_lp, **extra)
