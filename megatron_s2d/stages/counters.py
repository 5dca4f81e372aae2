"""Step counters summed over data-parallel ranks, and the stage's ledger (what it consumed and produced).

    c = StepCounters(prompts=len(step.indices), sequences=len(samples), generated_tokens=..., reward_sum=...)
    c = c.all_reduce(dp_group)          # one collective for every counter, by name
    state.ledger.add(c)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepCounters:
    """Per-step counts of this rank; ``all_reduce`` sums them over the data-parallel ranks."""

    prompts: float = 0.0  # prompts drawn
    sequences: float = 0.0  # sequences generated (prompts x samples)
    generated_tokens: float = 0.0
    teacher_scored_tokens: float = 0.0  # tokens whose teacher log-probs were used
    reward_sum: float = 0.0  # sparse rewards (GRPO, OPD with a task reward)
    zero_variance_groups: float = 0.0  # GRPO groups whose rewards are all equal
    trained_sequences: float = 0.0  # sequences that reached the loss (after dynamic sampling)

    def all_reduce(self, group) -> "StepCounters":
        from megatron_s2d.runtime.dist import all_reduce_sum

        names = [f.name for f in dataclasses.fields(self)]
        return StepCounters(**dict(zip(names, all_reduce_sum([getattr(self, n) for n in names], group))))


@dataclass
class Ledger:
    """What a stage consumed and produced (accumulated over its own steps; lineage adds the ancestors')."""

    labels_consumed: int = 0  # distinct labeled problems whose gold answers were used for a reward
    prompts: int = 0  # prompts drawn (with repetition across epochs)
    generated_tokens: int = 0
    teacher_scored_tokens: int = 0
    wall_time_s: float = 0.0

    def add(self, c: StepCounters) -> None:
        self.prompts += int(c.prompts)
        self.generated_tokens += int(c.generated_tokens)
        self.teacher_scored_tokens += int(c.teacher_scored_tokens)


@dataclass
class StageState:
    """Where a stage is: the next step to run and its ledger (saved in every checkpoint)."""

    step: int = 0
    ledger: Ledger = field(default_factory=Ledger)
