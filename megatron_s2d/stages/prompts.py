"""The prompt stream of a stage: which problems each step uses, this rank's share, and per-step sampling seeds.

    stream = PromptStream(problems, prompt_ids, seed=plan.seed, stage="opd", dp_rank=r, dp_size=d,
                          max_prompt_tokens=plan.data.max_prompt_tokens)   # longer prompts: refused, naming the row
    step = stream.step(7, count=stage.prompts_per_step)
    step.prompt_ids, step.answers, step.seed(salt=0)

Stateless in the step: step ``s`` draws the same prompts whenever it runs, so a resumed stage continues exactly
where it stopped. Problems are consumed in order of a seeded permutation per epoch (one pass over the split); a
step's prompts are split into contiguous blocks over the data-parallel ranks, so a prompt's samples (a GRPO group)
stay on one rank.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from megatron_s2d.data.types import Problem
from megatron_s2d.errors import InternalError, S2DError


@dataclass(frozen=True)
class StepPrompts:
    """This rank's prompts of one step."""

    step: int
    indices: list[int]  # into the split's problems
    prompt_ids: list[list[int]]
    answers: list[str]  # gold answers (labels: only reward-consuming stages read them)
    _seed_key: str

    def seed(self, salt: int = 0) -> int:
        """The sampling seed of this (stage, step, data-parallel rank, purpose)."""
        return int.from_bytes(hashlib.sha256(f"{self._seed_key}:{salt}".encode()).digest()[:4], "little")


def _refuse_long_prompts(problems: list[Problem], prompt_ids: list[list[int]], limit: int, stage: str,
                         split: str) -> None:
    """Every prompt must fit ``data.max_prompt_tokens``: the engines' context (vLLM's ``max_model_len``) is that
    plus ``rollout.max_new_tokens``, so a longer prompt would fail mid-run, at the step that draws it."""
    long = [i for i, ids in enumerate(prompt_ids) if len(ids) > limit]
    if long:
        i = long[0]
        longest = max(len(prompt_ids[j]) for j in long)
        raise S2DError(f"stages.{stage}: split {split!r} row {i} (problem {problems[i].id!r}) is a "
                       f"{len(prompt_ids[i])}-token prompt, longer than data.max_prompt_tokens = {limit} "
                       f"({len(long)} of the split's {len(prompt_ids)} prompts are, the longest {longest} tokens); "
                       "raise data.max_prompt_tokens (each model's context must hold it plus the stage's "
                       "rollout.max_new_tokens) or drop these problems from data.pool")


class PromptStream:
    def __init__(self, problems: list[Problem], prompt_ids: list[list[int]], *, seed: int, stage: str, split: str,
                 dp_rank: int, dp_size: int, max_prompt_tokens: int | None = None):
        if not problems:
            raise S2DError(f"stages.{stage}: split {split!r} is empty")
        if max_prompt_tokens is not None:
            _refuse_long_prompts(problems, prompt_ids, max_prompt_tokens, stage, split)
        self.problems, self.prompt_ids = problems, prompt_ids
        self.seed, self.stage, self.dp_rank, self.dp_size = seed, stage, dp_rank, dp_size

    def global_indices(self, step: int, count: int) -> list[int]:
        """The step's problem indices, all ranks together: a seeded permutation per epoch, consumed in order."""
        n = len(self.problems)
        perms: dict[int, torch.Tensor] = {}  # one permutation per epoch touched by this step
        out = []
        for i in range(step * count, (step + 1) * count):
            epoch, pos = divmod(i, n)
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
                perms[epoch] = torch.randperm(n, generator=g)
            out.append(int(perms[epoch][pos]))
        return out

    def step(self, step: int, count: int) -> StepPrompts:
        """This rank's share of step ``step`` (``count`` prompts over all ranks; the plan checks divisibility)."""
        if count % self.dp_size:
            raise InternalError(f"{count} prompts per step do not divide over {self.dp_size} data-parallel ranks "
                                "(the plan loader checks this)")
        per = count // self.dp_size
        idx = self.global_indices(step, count)[self.dp_rank * per:(self.dp_rank + 1) * per]
        return StepPrompts(step, idx, [self.prompt_ids[i] for i in idx], [self.problems[i].answer for i in idx],
                           f"{self.seed}:{self.stage}:{step}:{self.dp_rank}")

    def distinct_until(self, step: int, count: int) -> int:
        """Distinct problems drawn by steps 0..step (all ranks): the labels a reward-consuming stage has read."""
        return min((step + 1) * count, len(self.problems))
