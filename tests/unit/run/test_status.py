"""``s2d status``: each job's state read from the run folder alone (complete, running, failed or stopped at step k of
N with the exit code and log of its last local attempt, not started), and nothing written."""

import json
import os
import socket

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.run.status import exit_meaning, format_status, run_status
from tests.unit.run._run_folder import PLAN, job_record, snapshot, synthetic_run


@pytest.fixture
def run(tmp_path):
    logs = synthetic_run(tmp_path / "run")
    return tmp_path / "run", logs


def test_each_state_with_step_exit_code_and_log(run):
    root, logs = run
    before = snapshot(root)
    plan, statuses = run_status(root)
    by = {s.name: s for s in statuses}
    assert [s.name for s in statuses] == ["base_eval", "teacher_rl", "fkl", "opd", "student_rl", "cold", "extra"]
    assert by["base_eval"].line() == "complete"
    assert by["teacher_rl"].line() == "complete"
    # the latest attempt counts (exit 1), not the older one (exit 2)
    assert by["fkl"].line() == f"failed at step 2 of 3: exit code 1: the log's traceback says why; log: {logs['fkl']}"
    assert by["opd"].state == "stopped"
    assert by["opd"].line().startswith("stopped at step 3 of 5 (checkpoint at step 2): exit code 75: stopped by a "
                                       "signal after saving a checkpoint; re-run to resume")
    assert by["student_rl"].state == "running" and "since 2026-12-01 10:00:00" in by["student_rl"].detail
    assert by["student_rl"].line().startswith("running at step 1 of 6 (no checkpoint yet")
    assert by["cold"].line() == "stopped at step 0 of 2: re-run to resume"  # its lock's holder is dead
    assert by["extra"].line() == "not started"
    text = format_status(root, plan, statuses)
    assert text.splitlines()[0] == f"run {root} (plan {PLAN!r}, executor local)"
    assert text.splitlines()[-1] == "2/7 complete"
    assert snapshot(root) == before, "status wrote into the run folder"


def test_a_successful_attempt_without_complete_and_a_live_launcher(run):
    root, _ = run
    job_record(root, "extra", 0, attempt=1, state="SUCCEEDED")
    assert {s.name: s for s in run_status(root)[1]}["extra"].line().startswith(
        "stopped at step 0 of 2: its job exited 0 without writing COMPLETE; re-run to resume; log: ")
    # an attempt with no record yet while the launcher holds the run's lock: that job is running
    attempt = root / "nemo_run" / "experiments" / f"{PLAN}-cold" / f"{PLAN}-cold_1796652679000000000" / "cold"
    attempt.mkdir(parents=True)
    (root / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                           "since": "2026-12-01 08:00:00"}))
    plan, statuses = run_status(root)
    assert {s.name: s for s in statuses}["cold"].state == "running"
    assert "launcher: pid" in format_status(root, plan, statuses).splitlines()[1]


def test_exit_meanings():
    assert "killed by SIGKILL" in exit_meaning(-9) and "killed by SIGKILL" in exit_meaning(137)
    assert "bad input" in exit_meaning(2) and "re-run to resume" in exit_meaning(75)


def test_not_a_run_folder_and_a_damaged_record_are_named(run, tmp_path):
    with pytest.raises(S2DError, match=r"no plan\.resolved\.yaml there"):
        run_status(tmp_path / "nowhere")
    root, _ = run
    record = next((root / "nemo_run").rglob("SUCCESS"))
    record.write_text('{"final_state": "FAI')
    with pytest.raises(S2DError, match=rf"{record}: damaged JSON"):
        run_status(root)
    (root / "plan.resolved.yaml").write_text("stages: [unclosed\n")
    with pytest.raises(S2DError, match=r"plan\.resolved\.yaml: damaged"):
        run_status(root)
