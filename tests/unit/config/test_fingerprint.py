"""A stage's settings fingerprint (config drift): which fields change results, which are neutral, and what a record
written by an older megatron-s2d (without some field) is compared on."""

import dataclasses

from megatron_s2d.config.fingerprint import (
    fingerprint_digest, is_neutral, neutral_changes, result_changes, stage_fingerprint, unrecorded)
from megatron_s2d.config.schema import GRPOStageConfig, ModelConfig, OptimConfig, PlanConfig
from megatron_s2d.stages.provenance import Recorded, check_drift

import pytest

from megatron_s2d.errors import S2DError


def _plan(**stage):
    s = GRPOStageConfig(name="rl", kind="student_rl", split="1H", **stage)
    return PlanConfig(models={"teacher": ModelConfig(hf="/t"), "student": ModelConfig(hf="/s")}, stages=[s]), s


def test_result_changing_and_neutral_fields():
    plan, s = _plan()
    base = stage_fingerprint(plan, s)
    for changed, neutral in ((dict(steps=3), False), (dict(optim=OptimConfig(lr=0.5)), False),
                             (dict(save_every=5), True), (dict(micro_batch_tokens=1024), True)):
        p2, s2 = _plan(**changed)
        new = stage_fingerprint(p2, s2)
        assert bool(neutral_changes(base, new)) == neutral and bool(result_changes(base, new)) != neutral, changed
        assert (fingerprint_digest(new) == fingerprint_digest(base)) == neutral
    p3 = dataclasses.replace(plan, models={**plan.models, "student": ModelConfig(hf="/s", tp=2, dtype="fp32")})
    names = {k for k, _, _ in result_changes(base, stage_fingerprint(p3, s))}
    assert names == {"models.student.dtype"}  # tp is neutral (a stage resumes at any layout), dtype is not
    assert is_neutral("models.student.tp") and not is_neutral("seed") and not is_neutral("data.split.seed")


def test_fields_an_older_record_lacks_are_not_compared_but_said():
    plan, s = _plan(steps=2)
    now = stage_fingerprint(plan, s)
    old = {k: v for k, v in now.items() if k != "grpo.dual_clip_c" and not k.startswith("clip.dual")}
    assert not result_changes(old, now) and unrecorded(old, now)
    neutral = check_drift(plan, s, Recorded(old, "old/trainer_state.json", False))
    assert any(v == "<not recorded>" for _, v, _ in neutral)
    old["steps"] = 5
    with pytest.raises(S2DError, match=r"stages\.rl\.steps: 5 -> 2.*--restart rl"):
        check_drift(plan, s, Recorded(old, "old/trainer_state.json", False))
