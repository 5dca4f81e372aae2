"""A real (single-node) SLURM run of a two-stage plan with a stand-in stage entry: NeMo-Run submits afterok-chained
sbatch jobs; SIGUSR1 (what ``--signal=USR1@N`` sends before the time limit) reaches the torchrun workers through the
launcher agent, the stage saves and requeues itself (``scontrol requeue``), resumes, completes, and the dependent
stage and the report run after it.

Needs a running SLURM controller: ``apt-get install -y slurm-wlm munge && bash slurm/single_node_setup.sh`` (root).
Skipped when ``sinfo`` is missing or no controller answers. ~40 s.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.launch import jobs
from megatron_s2d.launch.experiment import launch_plan

pytestmark = [pytest.mark.functional, pytest.mark.slurm]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _why_not() -> str:
    status = REPO / ".slurm_setup_status"  # written by scripts/setup_slurm.sh (run by scripts/run_tests.sh)
    said = status.read_text().strip() if status.is_file() else "scripts/setup_slurm.sh has not run"
    if said.startswith("SLURM"):
        said = f"the daemons scripts/setup_slurm.sh started no longer answer (it said: {said})"
    return f"no SLURM controller: {said} (as root: scripts/setup_slurm.sh)"


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason=_why_not())


@needs_slurm
def test_slurm_chain_with_preemption_requeue(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "STAGE_ENTRY", "_fake_s2d_entry")
    monkeypatch.setattr(jobs, "REPORT_ENTRY", "_fake_s2d_entry")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan_d = {"name": "s2dslurm", "run_dir": str(run_dir), "toy_world": True, "models": {"teacher": {}, "student": {}},
              "eval": {"include_base": False},
              "stage_defaults": {"micro_batch_tokens": 256, "rollout": {"max_new_tokens": 16}},
              "stages": [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H"},
                         {"name": "fkl_warmup", "kind": "fkl_warmup", "teacher": "teacher_rl", "split": "1H"}],
              "launch": {"executor": "slurm", "nodes": 1, "procs_per_node": 2, "slurm": {
                  "time": "00:10:00", "gpus_per_node": 0, "exclusive": False, "job_dir": str(tmp_path / "jobs"),
                  "env": {"PYTHONPATH": f"{HERE}", "S2D_FAKE_WAIT": "teacher_rl"}}}}
    plan_path = run_dir / "plan.resolved.yaml"
    plan_path.write_text(yaml.safe_dump(plan_d))
    plan = load_plan(plan_path)
    planned = launch_plan(plan, str(plan_path), executor="slurm")
    handles = {j.id: j.handle.rsplit("/", 1)[-1] for j in planned.experiments[0].jobs}
    first = handles["teacher_rl"]
    assert re.fullmatch(r"\d+", first)
    assert f"Dependency=afterok:{first}" in _job(handles["fkl_warmup"]).replace("(unfulfilled)", "")

    log_dir = Path(planned.experiments[0].jobs[0].executor.job_dir)
    attempt0 = lambda: list(log_dir.glob(f"log-*_{first}_0.out"))  # noqa: E731
    _wait(lambda: attempt0() and "waiting for a signal" in attempt0()[0].read_text(), 90, "teacher_rl to start")
    subprocess.run(["scancel", "--signal=USR1", first], check=True)  # job steps only, like --signal=USR1@N
    _wait(lambda: "Restarts=1" in _job(first) and "JobState=PENDING" in _job(first), 60, "teacher_rl to requeue")
    assert (run_dir / "stages" / "teacher_rl" / "checkpoint").read_text().startswith("saved by rank")

    def started_again():  # SLURM holds a requeued job ~2 min (BeginTime); as root we may release it now
        subprocess.run(["scontrol", "update", f"jobid={first}", "StartTime=now"], capture_output=True)
        return "JobState=PENDING" not in _job(first)

    _wait(started_again, 180, "teacher_rl to start again")
    _wait(lambda: (run_dir / "report" / "REPORT_DONE").exists(), 180, "the chain to finish")
    assert (run_dir / "report" / "REPORT_DONE").read_text().split() == ["fkl_warmup", "teacher_rl"]
    assert "exiting 0" in attempt0()[0].read_text()  # EXIT_REQUEUED after a successful scontrol requeue
    assert list(log_dir.glob(f"log-*_{first}_1.out"))  # the second attempt (SLURM_RESTART_COUNT=1)


@needs_slurm
def test_real_toy_stage_through_slurm_runs_in_the_submitting_environment(mini_world, tmp_path):
    """`s2d run PLAN --executor slurm launch.slurm.gpus_per_node=0` with no environment hacks: the sbatch job runs the
    interpreter that ran s2d (not a bare `python` from the node's PATH, which has no megatron_s2d), a real stage trains
    to COMPLETE, and the report job runs after it."""
    from tests.functional.conftest import mini_plan, s2d, write_plan

    run = tmp_path / "run"
    plan = mini_plan(mini_world, run, [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "eval": False}],
                     eval={"k": 2, "max_new_tokens": 8, "include_base": False})
    plan["launch"] = {"executor": "slurm", "nodes": 1, "procs_per_node": 1,
                      "slurm": {"time": "00:10:00", "gpus_per_node": 0, "exclusive": False,
                                "job_dir": str(tmp_path / "jobs")}}
    path = write_plan(tmp_path / "plan.yaml", plan)
    dry = s2d("run", path, "--dry-run")
    assert f"SLURM jobs run {os.sys.executable} (the interpreter running s2d" in dry.stdout
    sub = s2d("run", path, "--executor", "slurm", "launch.slurm.gpus_per_node=0")
    assert "submitted 2 SLURM job(s): teacher_rl, report" in sub.stdout
    _wait(lambda: (run / "report" / "report.md").is_file(), 300, "the stage and the report job")
    assert (run / "stages" / "teacher_rl" / "COMPLETE").is_file()
    lineage = json.loads((run / "stages" / "teacher_rl" / "lineage.json").read_text())
    assert Path(lineage["final_checkpoint"]).is_dir() and lineage["steps"] == 2
    assert "| teacher_rl |" in (run / "report" / "report.md").read_text()
