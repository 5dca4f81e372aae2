"""Local jobs: one process runs the stage entry directly (no torchrun agent), more processes run under torchrun;
the rendered scripts say so."""

from pathlib import Path

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.errors import InternalError
from megatron_s2d.launch.experiment import JobSelection, plan_launch, render
from megatron_s2d.launch.jobs import STAGE_ENTRY, Job, job_command
from tests.unit.launch._plans import two_stage_plan, write_hf


def _local_plan(tmp_path: Path, procs: int):
    d = two_stage_plan(tmp_path, write_hf(tmp_path / "t"), write_hf(tmp_path / "s"),
                       launch={"executor": "local", "nodes": 1, "procs_per_node": procs})
    d["models"]["teacher"].update(tp=procs, dtype="fp32")
    d["models"]["student"].update(tp=procs, dtype="fp32")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_plan(path), path


@pytest.mark.parametrize("procs", [1, 2])
def test_local_scripts_use_torchrun_only_for_several_processes(tmp_path, procs):
    plan, path = _local_plan(tmp_path, procs)
    planned = plan_launch(plan, str(path), None, "local", JobSelection.dry_run(report=False))
    scripts = render(plan, planned, tmp_path / "dry")
    text = Path(scripts["teacher_rl"]).read_text()
    assert f"-m {STAGE_ENTRY} --plan" in text
    assert ("megatron_s2d.launch.agent" in text) == (procs > 1)
    if procs > 1:
        assert "--nproc-per-node 2" in text


def test_direct_command_refuses_several_processes():
    job = Job("opd", "stage")
    assert job_command(job, "p.yaml", "run", 1, 1, agent=False) == (STAGE_ENTRY, ["--plan", "p.yaml", "--stage", "opd"])
    with pytest.raises(InternalError, match="needs torchrun"):
        job_command(job, "p.yaml", "run", 1, 2, agent=False)
