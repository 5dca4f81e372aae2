"""The stage kinds: the tag of a plan's ``stages[i].kind`` -> its config class. A kind's facts (what it trains, what
generates its samples, its teachers, whether it consumes labels, rows per prompt) are methods of that class
(``config.schema.StageBase``); its loop is registered by class in ``stages.entry.LOOPS``. Adding a kind: one config
class, one loop file, one line here and one there.

    kind         config                  trains    samples from   teachers  labels
    teacher_rl   GRPOStageConfig         teacher   teacher        -         yes (the reward)
    student_rl   GRPOStageConfig         student   student        -         yes
    fkl_warmup   WarmupStageConfig       student   teacher        teacher   no (prompts only)
    opd          OPDStageConfig          student   student        teacher   if opd.task_reward_coef (mode sampled)
    teacher_sft  TeacherSFTStageConfig   teacher   teacher        -         yes (solutions, or the reward grading
                                                   (rejection; solutions: nothing sampled)    its samples)
"""

from __future__ import annotations

from megatron_s2d.config.schema import (
    GRPOStageConfig, OPDStageConfig, StageBase, TeacherSFTStageConfig, WarmupStageConfig,
)
from megatron_s2d.errors import S2DError

KINDS: dict[str, type[StageBase]] = {
    "teacher_rl": GRPOStageConfig,
    "student_rl": GRPOStageConfig,
    "fkl_warmup": WarmupStageConfig,
    "opd": OPDStageConfig,
    "teacher_sft": TeacherSFTStageConfig,
}


def config_class(kind: str, where: str) -> type[StageBase]:
    """The config class of tag ``kind`` (``where``: the plan location, for the error)."""
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise S2DError(f"{where}.kind = {kind!r} is not one of {sorted(KINDS)}") from None
