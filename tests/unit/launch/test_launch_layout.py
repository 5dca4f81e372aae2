"""Dry-run validation: layouts that do not divide the model or the world, DP splits, memory budget, config lookup,
and job selection (skipping complete stages, refusing missing parents)."""

from pathlib import Path

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.launch.checks import HF_CONFIGS_DIR, MemoryBudgetError, check_jobs, format_table, resolve_arch

REPO_ROOT = Path(__file__).resolve().parents[3]
from megatron_s2d.launch.jobs import plan_jobs
from megatron_s2d.stages.layout import RunLayout
from tests.unit.launch._plans import load, two_stage_plan, write_hf


def _check(plan, stages=None):
    return check_jobs(plan, plan_jobs(plan, stages, report=False, check_parents=False))


def test_valid_plan_reports_layouts(tmp_path):
    hf = write_hf(tmp_path / "m")
    checks = _check(load(tmp_path, two_stage_plan(tmp_path, hf, hf)))
    assert [c.job.name for c in checks] == ["teacher_rl", "opd"]
    assert checks[1].layouts == {"student": (2, 1, 4), "teacher": (2, 1, 4)}
    assert checks[1].world == 8 and checks[1].memory.fits


def test_tp_not_dividing_heads_is_refused(tmp_path):
    teacher = write_hf(tmp_path / "t", num_attention_heads=12, num_key_value_heads=4, head_dim=64, hidden_size=768)
    student = write_hf(tmp_path / "s")
    plan = load(tmp_path, two_stage_plan(tmp_path, teacher, student), ["models.teacher.tp=8"])
    with pytest.raises(S2DError, match=r"teacher_rl: models.teacher .*num_attention_heads = 12 is not divisible by "
                                       r"tensor_parallel = 8"):
        _check(plan)


def test_world_not_divisible_is_refused(tmp_path):
    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf))
    plan.launch.procs_per_node = 6  # after load-time validation: the dry run checks every job again
    plan.models["teacher"].tp = 4
    with pytest.raises(S2DError, match=r"tp x pp = 4 does not divide the world size 6"):
        _check(plan)


def test_uneven_dp_split_is_refused(tmp_path):
    hf = write_hf(tmp_path / "m")
    # refused when the plan is loaded (the stage job would fail at step 0), and by the dry run's own check
    with pytest.raises(S2DError, match=r"stages.opd.prompts_per_step = 3 does not divide over the 4 data-parallel"):
        load(tmp_path, two_stage_plan(tmp_path, hf, hf), ["stages.opd.prompts_per_step=3"])
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf))
    next(s for s in plan.stages if s.name == "opd").prompts_per_step = 3
    with pytest.raises(S2DError, match=r"stages.opd.prompts_per_step = 3 does not divide over the 4"):
        _check(plan)


def test_over_memory_names_stage_and_numbers(tmp_path):
    """Memory alone over budget: the error names every stage, phase and term, and carries every job's check so the
    dry run can print the table (over-budget peaks flagged with "!") before it fails."""
    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf), ["launch.gpu_memory_gib=1"])
    with pytest.raises(MemoryBudgetError) as e:
        _check(plan)
    msg = str(e.value)
    assert "6 problem(s)" in msg  # per stage: training, rollouts on the megatron sampler, the final evaluation
    for stage in ("teacher_rl", "opd"):
        assert f"stages.{stage}: the training phase needs weights" in msg
        assert f"stages.{stage}: rollouts on the megatron sampler need" in msg
    assert "GiB per GPU > launch.gpu_memory_gib = 1;" in msg
    assert [c.job.name for c in e.value.checks] == ["teacher_rl", "opd"]
    table = format_table(e.value.checks, {})
    assert "train_peak" in table and "gen_peak" in table
    row = next(line for line in table.splitlines() if line.startswith("teacher_rl"))
    assert row.count("!") == 2  # both phases flagged


def test_real_70b_recipe_on_two_nodes_is_over_budget():
    from megatron_s2d.config import load_plan

    plan = load_plan(REPO_ROOT / "run_configs" / "llama3.3_70b_to_llama3.1_8b.yaml", ["launch.nodes=2"])
    with pytest.raises(S2DError, match=r"stages.teacher_rl: the training phase needs .*optimizer 49\.\d"):
        _check(plan, ["teacher_rl"])


def test_hf_config_lookup(tmp_path):
    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, "/nowhere/Qwen3-8B", hf))
    arch, where = resolve_arch(plan, "teacher")
    assert where == str(HF_CONFIGS_DIR / "Qwen3-8B" / "config.json") and arch.num_layers == 36
    assert resolve_arch(plan, "student")[1] == str(tmp_path / "m" / "config.json")
    plan.models["teacher"].hf = "/nowhere/NotAModel-7B"
    with pytest.raises(S2DError, match=r"models.teacher.hf = '/nowhere/NotAModel-7B': no config.json .*NotAModel-7B"):
        resolve_arch(plan, "teacher")


def test_job_selection(tmp_path):
    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf), ["eval.include_base=true"])
    jobs = plan_jobs(plan)
    assert [(j.name, j.deps) for j in jobs] == [
        ("base_eval", ()), ("teacher_rl", ()), ("opd", ("teacher_rl",)), ("report", ("base_eval", "teacher_rl", "opd"))]
    with pytest.raises(S2DError, match=r"stage 'opd' reads stage 'teacher_rl', which is neither complete"):
        plan_jobs(plan, ["opd"])
    with pytest.raises(S2DError, match=r"--stages nope: no such stage"):
        plan_jobs(plan, ["nope"])
    marker = RunLayout.of(plan.run_dir).complete_marker("teacher_rl")
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    assert [(j.name, j.deps) for j in plan_jobs(plan, ["opd"], report=False)] == [("opd", ())]
    assert [j.name for j in plan_jobs(plan)] == ["base_eval", "opd", "report"]  # complete stages are skipped
    assert [j.complete for j in plan_jobs(plan, include_complete=True, report=False)] == [False, True, False]
