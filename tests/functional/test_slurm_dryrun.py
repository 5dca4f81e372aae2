"""Every recipe in run_configs/ (and the cluster profile example) passes the SLURM dry run: layouts and memory
validate against the shipped HF configs, and NeMo-Run renders one sbatch script per job.

``base_*.yaml`` are bases, not plans (they lack models). No cluster and no weights are needed.
"""

from pathlib import Path

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.config.validate import topo_order
from megatron_s2d.launch.experiment import dry_run, launch_plan

pytestmark = pytest.mark.functional

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO_ROOT / "run_configs").glob("*.yaml") if not p.name.startswith("base_"))
PROFILES = [REPO_ROOT / "slurm" / "cluster_example.yaml"]


@pytest.mark.parametrize("path", RECIPES + PROFILES, ids=lambda p: p.name)
def test_recipe_dry_run(path: Path, tmp_path, capsys):
    plan = load_plan(path, [f"run_dir={tmp_path / 'run'}", f"launch.slurm.job_dir={tmp_path / 'jobs'}"])
    planned = launch_plan(plan, str(tmp_path / "run" / "plan.resolved.yaml"), executor="slurm", dry_run=True)
    stages = [s.name for s in topo_order(plan)]
    expected = (["base_eval"] if plan.eval.include_base else []) + stages + ["report"]
    assert [j.name for j in planned.jobs] == expected
    for name in expected:
        script = tmp_path / "run" / "dry_run" / f"{name}.sbatch"
        text = script.read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH --requeue" in text
        if name != "report":
            assert f"#SBATCH --nodes={plan.launch.nodes}\n" in text and "#SBATCH --signal=USR1@" in text
            assert f"--stage {name}" in text
    out = capsys.readouterr().out
    assert f"dry run OK: {len(expected)} job(s)" in out
    assert all(c.memory.total_gib <= plan.launch.gpu_memory_gib for c in planned.checks)


def test_gpu_recipes_use_real_model_sizes(tmp_path):
    plan = load_plan(REPO_ROOT / "run_configs" / "llama3.3_70b_to_llama3.1_8b.yaml", [f"run_dir={tmp_path}"])
    planned = launch_plan(plan, str(tmp_path / "plan.resolved.yaml"), executor="slurm", dry_run=True)
    opd = next(c for c in planned.checks if c.job.name == "opd")
    assert opd.layouts == {"student": (2, 1, 16), "teacher": (8, 2, 2)}
    assert round(opd.params["teacher"] / 1e9, 2) == 70.55 and round(opd.params["student"] / 1e9, 2) == 8.03


def test_cli_dry_run_entry_local(tmp_path, capsys):
    """``dry_run`` (what ``s2d run --dry-run`` calls) on the toy recipe with the local executor: command files."""
    plan = load_plan(REPO_ROOT / "run_configs" / "toy_cpu.yaml", [f"run_dir={tmp_path}"])
    assert dry_run(plan, "run_configs/toy_cpu.yaml", executor="local") == 0
    out = capsys.readouterr().out
    assert "dry run of run_configs/toy_cpu.yaml" in out and "teacher_rl" in out
    text = (tmp_path / "dry_run" / "opd.sh").read_text()
    # one local process: the entry runs directly, without a torchrun agent in front (~6 s less per job)
    assert f"python -m megatron_s2d.stages.entry --plan {tmp_path}/plan.resolved.yaml --stage opd" in text
    assert "megatron_s2d.launch.agent" not in text
    assert not (tmp_path / "dry_run" / "report.sh").exists()  # local: the CLI writes the report itself
