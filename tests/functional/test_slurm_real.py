"""A real (single-node) SLURM cluster: a two-stage plan with a stand-in stage entry (NeMo-Run submits afterok-chained
sbatch jobs; SIGUSR1, what ``--signal=USR1@N`` sends before the time limit, reaches the torchrun workers through the
launcher agent, the stage saves and requeues itself with ``scontrol requeue``, resumes, completes, and the dependent
stage and the report run after it), and a real toy stage submitted with ``s2d run --executor slurm`` that must run in
the submitting environment (the venv's interpreter) and train to COMPLETE before the report job.

Needs the single-node test cluster: ``scripts/setup_slurm.sh`` (run by ``scripts/run_tests.sh``; as root with apt-get
it installs slurm-wlm + munge and runs ``slurm/single_node_setup.sh``). Skipped, with the reason, when no controller
with a usable node answers, or when the cluster is not that test cluster (ClusterName s2dtest; set
``S2D_SLURM_TESTS=1`` to run on another one whose nodes share this machine's /tmp). ~45-60 s on 2 cores.
"""

import json
import os
import re
import shutil
import subprocess
import sys
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


TEST_CLUSTER = "s2dtest"  # slurm/single_node_setup.sh
USABLE = ("idle", "mixed", "allocated", "completing")


def _slurm_state() -> tuple[bool, str]:
    """(usable, why not): a controller answers, a node can run jobs, and it is the single-node test cluster."""
    if not shutil.which("sinfo"):
        return False, ""
    try:  # a live controller answers in well under a second; a dead one makes sinfo retry for ~10 s
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
        if info.returncode != 0:
            return False, ""
        states = info.stdout.split()
        if not any(st.rstrip("*~#") in USABLE for st in states):
            return False, f"the SLURM controller answers but no node can run jobs (node states: {states or 'none'})"
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False, ""
    name = re.search(r"^ClusterName\s*=\s*(\S+)", conf, re.M)
    if (name and name.group(1)) != TEST_CLUSTER and os.environ.get("S2D_SLURM_TESTS") != "1":
        return False, (f"SLURM cluster {name.group(1) if name else '?'!r} is not the single-node test cluster "
                       f"{TEST_CLUSTER!r} (slurm/single_node_setup.sh); S2D_SLURM_TESTS=1 runs these tests on it")
    return True, ""


def _wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _why_not(said_here: str) -> str:
    if said_here:
        return said_here
    status = REPO / ".slurm_setup_status"  # written by scripts/setup_slurm.sh (run by scripts/run_tests.sh)
    said = status.read_text().strip() if status.is_file() else "it has not run"
    if said.startswith("SLURM"):
        return (f"no SLURM controller answers, although scripts/setup_slurm.sh had brought one up (it said: {said}); "
                "re-run it as root")
    return f"no SLURM controller answers; scripts/setup_slurm.sh (run by scripts/run_tests.sh): {said}"


_UP, _WHY = _slurm_state()
needs_slurm = pytest.mark.skipif(not _UP, reason=_why_not(_WHY))


def _jobs_under(folder: Path) -> dict[str, dict[str, str]]:
    """The SLURM jobs whose sbatch script lives under ``folder`` (this test's job_dir), by id: JobName, JobState,
    ExitCode, StdOut... (``scontrol`` keeps finished jobs for MinJobAge = 300 s)."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w[\w/:]*)=(\S*)", line))
        if fields.get("Command", "").startswith(f"{folder}/"):
            found[fields["JobId"]] = fields
    return found


def _logs(folder: Path, limit: int = 3000) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-limit:]}" for p in sorted(folder.rglob("*.out")))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")


@pytest.fixture
def job_dir(tmp_path):
    """This test's NeMo-Run job_dir; whatever it submitted and left queued or running is cancelled afterwards."""
    folder = tmp_path / "jobs"
    yield folder
    left = [i for i, j in _jobs_under(folder).items() if j["JobState"] not in ENDED]
    if left:
        subprocess.run(["scancel", *left], capture_output=True)


@needs_slurm
def test_slurm_chain_with_preemption_requeue(tmp_path, job_dir, monkeypatch):
    monkeypatch.setattr(jobs, "STAGE_ENTRY", "_fake_s2d_entry")
    monkeypatch.setattr(jobs, "REPORT_ENTRY", "_fake_s2d_entry")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan_d = {"name": "s2dslurm", "run_dir": str(run_dir), "toy_world": True, "models": {"teacher": {}, "student": {}},
              "eval": {"include_base": False, "max_new_tokens": 16}, "data": {"max_prompt_tokens": 128},  # toy context: 256
              "stage_defaults": {"micro_batch_tokens": 256, "rollout": {"max_new_tokens": 16}},
              "stages": [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H"},
                         {"name": "fkl_warmup", "kind": "fkl_warmup", "teacher": "teacher_rl", "split": "1H"}],
              "launch": {"executor": "slurm", "nodes": 1, "procs_per_node": 2, "slurm": {
                  "time": "00:10:00", "gpus_per_node": 0, "exclusive": False, "job_dir": str(job_dir),
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
def test_real_toy_stage_through_slurm_runs_in_the_submitting_environment(mini_world, tmp_path, job_dir):
    """`s2d run PLAN --executor slurm launch.slurm.gpus_per_node=0` with no environment hacks: the sbatch job runs the
    interpreter that ran s2d (not a bare `python` from the node's PATH, which has no megatron_s2d), a real stage trains
    to COMPLETE, and the report job runs after it."""
    from tests.functional.conftest import mini_plan, s2d, write_plan

    run = tmp_path / "run"
    plan = mini_plan(mini_world, run, [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "eval": False}],
                     eval={"k": 2, "max_new_tokens": 8, "include_base": False})
    plan["launch"] = {"executor": "slurm", "nodes": 1, "procs_per_node": 1,
                      "slurm": {"time": "00:10:00", "gpus_per_node": 0, "exclusive": False,
                                "job_dir": str(job_dir)}}
    path = write_plan(tmp_path / "plan.yaml", plan)
    dry = s2d("run", path, "--dry-run")
    assert f"SLURM jobs run {sys.executable} (the interpreter running s2d" in dry.stdout
    sub = s2d("run", path, "--executor", "slurm", "launch.slurm.gpus_per_node=0")
    assert "submitted 2 SLURM job(s): teacher_rl, report" in sub.stdout
    submitted = _jobs_under(job_dir)
    assert sorted(j["JobName"] for j in submitted.values()) == ["mini-report", "mini-teacher_rl"], submitted
    try:
        _wait(lambda: all(j["JobState"] in ENDED for j in _jobs_under(job_dir).values()), 300,
              "the stage and the report job to end (scontrol show job)")
    finally:
        states = {j["JobName"]: (j["JobState"], j["ExitCode"]) for j in _jobs_under(job_dir).values()}
        if any(state != "COMPLETED" for state, _ in states.values()):
            pytest.fail(f"SLURM jobs did not all complete: {states}\n{_logs(job_dir)}")
    stage = run / "stages" / "teacher_rl"
    assert (stage / "COMPLETE").is_file()
    lineage = json.loads((stage / "lineage.json").read_text())
    assert Path(lineage["final_checkpoint"]).is_dir() and lineage["steps"] == 2
    assert any((stage / "checkpoints").iterdir())
    assert "| teacher_rl |" in (run / "report" / "report.md").read_text()
    stage_log = next(job_dir.rglob("log-mini-teacher_rl_*_0.out")).read_text()
    assert "No module named" not in stage_log
