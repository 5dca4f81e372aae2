"""The one registry of stage kinds: what each kind trains, what generates its samples, whether it needs a teacher and
consumes labels, how many rows a prompt gives, its config class and its loop. Validation, the dry run, the memory
estimate, the report and the job entry all read it; nothing else compares kind strings.

    kind         config              trains    samples from   teacher  labels                  loop
    teacher_rl   GRPOStageConfig     teacher   teacher        no       yes (the reward)        stages.grpo
    student_rl   GRPOStageConfig     student   student        no       yes                     stages.grpo
    fkl_warmup   WarmupStageConfig   student   teacher        yes      no (prompts only)       stages.fkl_warmup
    opd          OPDStageConfig      student   student        yes      if opd.task_reward_coef stages.opd
                                                                       (mode sampled)
    teacher_sft  TeacherSFTStage-    teacher   teacher        no       yes (solutions: the     stages.teacher_sft
                 Config                        (rejection;             reference solution;
                                               solutions: none)        rejection: the reward)

``teacher_sft`` with ``sft.source: solutions`` generates nothing; its kind still says ``samples_from: teacher`` (the
memory estimate and the dry run then budget a generation it does not run: an over-estimate, never an under-one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from megatron_s2d.config.schema import (
    GRPOStageConfig, OPDStageConfig, StageBase, StageConfig, TeacherSFTStageConfig, WarmupStageConfig,
)
from megatron_s2d.errors import S2DError

Role = Literal["teacher", "student"]


@dataclass(frozen=True)
class StageKind:
    name: str
    config: type  # the stage's config class (the tagged union's member)
    trains: Role  # the model whose weights the stage updates (its job's parallel layout is this model's)
    samples_from: Role  # the model whose rollouts it trains on
    needs_teacher: bool  # a frozen teacher scores or generates (``stage.teacher`` is required)
    consumes_labels: Callable[[StageConfig], bool]  # whether the stage reads gold answers of its split
    rows_per_prompt: Callable[[StageConfig], int]  # training sequences per prompt
    loop: str  # "module:function" of the stage loop (imported by the job entry; config sits below stages)


def _opd_reads_reward(stage: OPDStageConfig) -> bool:
    """Only sampled OPD blends the task reward into its advantages (``stages.opd.SampledOPD``); the top-k loss never
    reads it (``opd.mode: topk`` with a task reward is refused when the plan is loaded), so it consumes no labels."""
    return stage.opd.mode == "sampled" and stage.opd.task_reward_coef != 0


def _sft_rows(stage: TeacherSFTStageConfig) -> int:
    """Training sequences per prompt: its reference solution, or at most its ``sft.samples_per_prompt`` kept samples
    (an upper bound: only the samples the reward grades correct are kept)."""
    return 1 if stage.sft.source == "solutions" else stage.sft.samples_per_prompt


KINDS: dict[str, StageKind] = {
    "teacher_rl": StageKind("teacher_rl", GRPOStageConfig, "teacher", "teacher", False, lambda s: True,
                            lambda s: s.samples_per_prompt, "megatron_s2d.stages.grpo:run"),
    "student_rl": StageKind("student_rl", GRPOStageConfig, "student", "student", False, lambda s: True,
                            lambda s: s.samples_per_prompt, "megatron_s2d.stages.grpo:run"),
    "fkl_warmup": StageKind("fkl_warmup", WarmupStageConfig, "student", "teacher", True, lambda s: False,
                            lambda s: s.warmup.teacher_samples_per_prompt, "megatron_s2d.stages.fkl_warmup:run"),
    "opd": StageKind("opd", OPDStageConfig, "student", "student", True, _opd_reads_reward,
                     lambda s: s.samples_per_prompt, "megatron_s2d.stages.opd:run"),
    "teacher_sft": StageKind("teacher_sft", TeacherSFTStageConfig, "teacher", "teacher", False, lambda s: True,
                             _sft_rows, "megatron_s2d.stages.teacher_sft:run"),
}


def kind_of(stage: StageBase) -> StageKind:
    try:
        return KINDS[stage.kind]
    except KeyError:
        raise S2DError(f"stages.{stage.name}.kind = {stage.kind!r} is not one of {sorted(KINDS)}") from None


def trained_model(stage: StageBase) -> Role:
    """Which model of the plan a stage trains."""
    return kind_of(stage).trains


def generating_model(stage: StageBase) -> Role:
    """The model whose samples a stage trains on: the teacher for the forward-KL warmup, else the policy."""
    return kind_of(stage).samples_from


def consumes_labels(stage: StageBase) -> bool:
    """RL stages use gold answers; so does OPD when the sparse task reward is mixed into its dense reward, and the
    teacher's SFT (the reference solutions, or the reward that grades its samples)."""
    return kind_of(stage).consumes_labels(stage)


def rows_per_prompt(stage: StageBase) -> int:
    """Training sequences per prompt: the teacher samples of the forward-KL warmup, the policy's samples otherwise."""
    return kind_of(stage).rows_per_prompt(stage)


def reads_solutions(stage: StageBase) -> bool:
    """Whether a stage trains on the reference solutions of its split's rows (``teacher_sft`` with
    ``sft.source: solutions``): its pool must carry them (refused before anything runs, ``data.sources``)."""
    return isinstance(stage, TeacherSFTStageConfig) and stage.sft.source == "solutions"


def models_of(stage: StageBase) -> list[Role]:
    """The models a stage job holds: the one it trains, plus the teacher if it needs one."""
    k = kind_of(stage)
    return [k.trains] + (["teacher"] if k.needs_teacher and k.trains != "teacher" else [])
