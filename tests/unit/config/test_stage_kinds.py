"""The registry of stage kinds is complete: every kind has a config class whose ``kind`` literal names it and a loop
that imports; validation, the dry run, the memory estimate and the job entry read these facts from it."""

import importlib
import typing

from megatron_s2d.config.kinds import KINDS, consumes_labels, generating_model, models_of, rows_per_prompt
from megatron_s2d.config.schema import GRPOStageConfig, OPDConfig, OPDStageConfig, WarmupConfig, WarmupStageConfig


def test_every_kind_has_its_class_and_a_loop():
    for name, kind in KINDS.items():
        assert name in typing.get_args(typing.get_type_hints(kind.config)["kind"])
        module, func = kind.loop.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_facts_per_kind():
    warm = WarmupStageConfig(name="w", teacher="base", warmup=WarmupConfig(teacher_samples_per_prompt=3))
    opd = OPDStageConfig(name="o", teacher="base", samples_per_prompt=2)
    rl = GRPOStageConfig(name="r", kind="teacher_rl", samples_per_prompt=8)
    assert (generating_model(warm), generating_model(opd), generating_model(rl)) == ("teacher", "student", "teacher")
    assert (rows_per_prompt(warm), rows_per_prompt(opd), rows_per_prompt(rl)) == (3, 2, 8)
    assert models_of(warm) == ["student", "teacher"] and models_of(rl) == ["teacher"]
    assert consumes_labels(rl) and not consumes_labels(warm) and not consumes_labels(opd)
    assert consumes_labels(OPDStageConfig(name="o", teacher="base", opd=OPDConfig(task_reward_coef=0.1)))
