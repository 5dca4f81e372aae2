"""The stage job starts math-verify workers only for a stage that grades samples against labels: GRPO, and OPD with
a task reward. The forward-KL warmup and plain OPD read no labels and start none (real worker processes)."""

import pytest

from megatron_s2d.config.schema import (GRPOStageConfig, OPDConfig, OPDStageConfig, PlanConfig, WarmupStageConfig)
from megatron_s2d.rewards.pool import get_pool, shutdown_pool
from megatron_s2d.runtime.preemption import PreemptionHandler
from megatron_s2d.stages.entry import warm_reward_pool


@pytest.fixture
def plan():
    shutdown_pool()
    yield PlanConfig(stages=[
        GRPOStageConfig(name="teacher_rl", kind="teacher_rl", split="1H"),
        WarmupStageConfig(name="fkl", teacher="teacher_rl", split="1H"),
        OPDStageConfig(name="opd", teacher="teacher_rl", split="1H"),
        OPDStageConfig(name="opd_reward", teacher="teacher_rl", split="1H", opd=OPDConfig(task_reward_coef=0.5))])
    shutdown_pool()


def test_no_workers_for_stages_that_read_no_labels(plan):
    for name in ("fkl", "opd"):
        assert not warm_reward_pool(plan, name, PreemptionHandler())
    assert get_pool().size == 0 and get_pool().n_started == 0


@pytest.mark.parametrize("name", ["teacher_rl", "opd_reward"])
def test_workers_ready_for_stages_that_grade(plan, name):
    assert warm_reward_pool(plan, name, PreemptionHandler())
    assert get_pool().size == 2 and get_pool().n_started == 2


def test_no_workers_when_the_plan_grades_with_hendrycks(plan):
    """``grader: hendrycks_boxed`` grades in process: even a GRPO stage starts no math-verify worker."""
    plan.grader = "hendrycks_boxed"
    assert not warm_reward_pool(plan, "teacher_rl", PreemptionHandler())
    assert get_pool().size == 0 and get_pool().n_started == 0
