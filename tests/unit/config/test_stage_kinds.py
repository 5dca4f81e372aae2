"""The registry of stage kinds is complete: every kind has a config class whose ``kind`` literal names it and a loop
registered for that class; validation, the dry run, the memory estimate and the job entry ask the class its facts."""

import typing

from megatron_s2d.config.kinds import KINDS
from megatron_s2d.config.schema import (GRPOStageConfig, OPDConfig, OPDStageConfig, SFTConfig, TeacherSFTStageConfig,
                                        WarmupConfig, WarmupStageConfig)
from megatron_s2d.stages.entry import loop_of


def test_every_kind_has_its_class_and_a_loop():
    for name, cls in KINDS.items():
        assert name in typing.get_args(typing.get_type_hints(cls)["kind"])
        stage = cls(name="s", kind=name)
        assert callable(loop_of(stage)) and stage.trains in ("teacher", "student")
        assert isinstance(stage.consumes_labels(), bool) and stage.rows_per_prompt() >= 1


def test_generates():
    assert GRPOStageConfig(name="g").generates() and OPDStageConfig(name="o").generates()
    assert TeacherSFTStageConfig(name="t", sft=SFTConfig(source="rejection")).generates()
    assert not TeacherSFTStageConfig(name="t", sft=SFTConfig(source="solutions")).generates()


def test_facts_per_kind():
    warm = WarmupStageConfig(name="w", teacher="base", warmup=WarmupConfig(teacher_samples_per_prompt=3))
    opd = OPDStageConfig(name="o", teacher="base", samples_per_prompt=2)
    rl = GRPOStageConfig(name="r", kind="teacher_rl", samples_per_prompt=8)
    assert (warm.samples_from, opd.samples_from, rl.samples_from) == ("teacher", "student", "teacher")
    assert (warm.rows_per_prompt(), opd.rows_per_prompt(), rl.rows_per_prompt()) == (3, 2, 8)
    assert warm.models() == ["student", "teacher"] and rl.models() == ["teacher"]
    assert rl.consumes_labels() and not warm.consumes_labels() and not opd.consumes_labels()
    assert OPDStageConfig(name="o", teacher="base", opd=OPDConfig(task_reward_coef=0.1)).consumes_labels()
