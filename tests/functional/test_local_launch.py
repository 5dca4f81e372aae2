"""The local executor end to end with a stand-in stage entry (``_fake_s2d_entry``): jobs run one after another
under torchrun (2 processes), their output reaches the terminal, a failing stage stops the plan with an error naming
it and its log file, and a re-run skips complete stages and resumes with the failed one."""

import os
from pathlib import Path

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.errors import S2DError
from megatron_s2d.launch import jobs
from megatron_s2d.launch.experiment import launch_plan, run_plan

pytestmark = pytest.mark.functional

HERE = Path(__file__).resolve().parent


def test_local_run_fails_loudly_then_resumes(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(jobs, "STAGE_ENTRY", "_fake_s2d_entry")
    monkeypatch.setattr(jobs, "REPORT_ENTRY", "_fake_s2d_entry")
    monkeypatch.setenv("PYTHONPATH", f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run_dir = tmp_path / "run"
    plan_d = {"name": "loc", "run_dir": str(run_dir), "toy_world": True, "models": {"teacher": {}, "student": {}},
              "eval": {"include_base": False, "max_new_tokens": 16}, "data": {"max_prompt_tokens": 128},  # toy context: 256 positions
              "stage_defaults": {"micro_batch_tokens": 256, "rollout": {"max_new_tokens": 16}},
              "stages": [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H"},
                         {"name": "fkl_warmup", "kind": "fkl_warmup", "teacher": "teacher_rl", "split": "1H"}],
              "launch": {"executor": "local", "nodes": 1, "procs_per_node": 2}}
    run_dir.mkdir()
    plan_path = run_dir / "plan.resolved.yaml"
    plan_path.write_text(yaml.safe_dump(plan_d))
    plan = load_plan(plan_path)

    monkeypatch.setenv("S2D_FAKE_FAIL", "fkl_warmup")
    with pytest.raises(S2DError, match=r"job 'fkl_warmup' failed \(FAILED\); log: .*fkl_warmup.*combined\.log"):
        run_plan(plan, str(plan_path), report=True)
    out = capfd.readouterr().out
    assert "[fake] stage teacher_rl rank 0 step 2" in out and "[fake] stage teacher_rl rank 1 step 2" in out
    assert "fkl_warmup failing on purpose" in out  # the failing job's stderr is streamed too
    assert (run_dir / "stages" / "teacher_rl" / "COMPLETE").is_file()
    assert not (run_dir / "stages" / "fkl_warmup" / "COMPLETE").exists()
    assert not (run_dir / "report").exists()  # nothing ran after the failure
    # `s2d status` reads the launcher's own records of that: the failed job's exit code and its log
    from megatron_s2d.run.status import run_status

    status = {s.name: s for s in run_status(run_dir)[1]}
    assert status["teacher_rl"].state == "complete" and status["fkl_warmup"].state == "failed"
    # (torchx records the torchrun agent's code, which is the failing rank's: launch.agent passes it on)
    assert status["fkl_warmup"].detail.startswith("exit code 3") and "fkl_warmup/0/combined.log" in \
        status["fkl_warmup"].detail

    monkeypatch.delenv("S2D_FAKE_FAIL")
    planned = launch_plan(plan, str(plan_path), report=True)
    assert [j.name for j in planned.jobs] == ["fkl_warmup", "report"]  # teacher_rl is complete: skipped
    out = capfd.readouterr().out
    assert "stage teacher_rl" not in out and "[fake] stage fkl_warmup rank 1 step 2" in out
    assert (run_dir / "report" / "REPORT_DONE").read_text().split() == ["fkl_warmup", "teacher_rl"]
