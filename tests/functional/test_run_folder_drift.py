"""A run folder that never drifts or loses work (issue 18, items 2-4), through the installed ``s2d``:

* a completed stage re-run with a result-changing setting is refused, naming the field old -> new (it used to print
  "nothing to run"); a stage stopped with checkpoints and re-run with other settings is refused (it used to
  "complete" under a config that never trained); a neutral setting passes; ``--restart`` sets the folder and its
  descendants aside (never deleted) and redoes them; the stage job refuses too when started by hand;
* a dry run, or a run refused for a bad setting, leaves ``plan.resolved.yaml`` as it was;
* Ctrl-C / kill of the launcher stop the running job with a checkpoint and the launcher exits 128 + signal;
* the warmup's teacher cache is regenerated when it was made with other settings (item 9).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.functional.conftest import ROOT, mini_plan, s2d, s2d_console_script, write_plan

pytestmark = pytest.mark.functional

TWO = [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "eval": False},
       {"name": "student_rl", "kind": "student_rl", "split": "2H", "eval": False, "control": "cold_grpo"},
       {"name": "fkl", "kind": "fkl_warmup", "teacher": "teacher_rl", "split": "1H", "eval": False,
        "warmup": {"topk": 4, "teacher_samples_per_prompt": 2}}]


def _bare_env() -> dict:
    """The environment of a stage entry started by hand: one process, no torchrun variables (it picks its own port)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


def _plan(mini_world, tmp_path, **extra):
    run = tmp_path / "run"
    return run, write_plan(tmp_path / "plan.yaml", mini_plan(mini_world, run, TWO,
                                                             eval={"k": 1, "max_new_tokens": 8,
                                                                   "include_base": False}, **extra))


def test_drift_is_refused_and_restart_sets_aside(mini_world, tmp_path):
    run, plan = _plan(mini_world, tmp_path)
    s2d("run", plan, "stage_defaults.save_every=1")
    resolved = (run / "plan.resolved.yaml").read_bytes()
    lineage = json.loads((run / "stages" / "teacher_rl" / "lineage.json").read_text())
    assert lineage["config_fields"]["steps"] == 2 and len(lineage["config_hash"]) == 16

    # a completed stage with a result-changing setting: refused, naming the field and the way out
    r = s2d("run", plan, "stage_defaults.save_every=1", "stages.teacher_rl.steps=3", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stages.teacher_rl.steps: 2 -> 3" in r.stderr and "--restart teacher_rl" in r.stderr
    assert (run / "plan.resolved.yaml").read_bytes() == resolved  # refused: the live plan is untouched
    # the dry run says the same, and writes nothing of the run's state
    r = s2d("run", plan, "stage_defaults.save_every=1", "stages.teacher_rl.steps=3", "--dry-run", check=False)
    assert r.returncode == 2 and "stages.teacher_rl.steps: 2 -> 3" in r.stderr
    # a neutral setting (checkpoint cadence) is allowed: nothing to run
    r = s2d("run", plan, "stage_defaults.save_every=2")
    assert "nothing to run" in r.stdout and "save_every" in r.stdout

    # a stage stopped with checkpoints (no COMPLETE): re-run with another lr is refused as well
    (run / "stages" / "fkl" / "COMPLETE").unlink()
    (run / "stages" / "fkl" / "lineage.json").unlink()
    r = s2d("run", plan, "stage_defaults.save_every=1", "stages.fkl.optim.lr=0.5", check=False)
    assert r.returncode == 2 and "stages.fkl.optim.lr: 0.001 -> 0.5" in r.stderr and "started" in r.stderr
    # the job itself refuses too (a resubmitted SLURM job, or one started by hand with an edited plan)
    edited = yaml.safe_load(resolved)
    next(s for s in edited["stages"] if s["name"] == "fkl")["optim"]["lr"] = 0.5
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    job = subprocess.run([sys.executable, "-m", "megatron_s2d.stages.entry", "--plan", str(tmp_path / "edited.yaml"),
                          "--stage", "fkl"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=_bare_env())
    assert job.returncode == 2, job.stdout + job.stderr
    assert "stages.fkl.optim.lr: 0.001 -> 0.5" in job.stderr
    next(s for s in edited["stages"] if s["name"] == "teacher_rl")["steps"] = 5
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    job = subprocess.run([sys.executable, "-m", "megatron_s2d.stages.entry", "--plan", str(tmp_path / "edited.yaml"),
                          "--stage", "teacher_rl"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=_bare_env())
    assert job.returncode == 2 and "stages.teacher_rl.steps: 2 -> 5" in job.stderr, job.stdout + job.stderr

    # --restart: teacher_rl and its descendant fkl are set aside (kept), then redone with the new settings
    old_ckpts = sorted(p.name for p in (run / "stages" / "teacher_rl" / "checkpoints").iterdir())
    r = s2d("run", plan, "stage_defaults.save_every=1", "stages.teacher_rl.steps=3", "--restart", "teacher_rl")
    aside = sorted((run / "set_aside").iterdir())
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["fkl", "teacher_rl"]
    assert sorted(p.name for p in (aside[0] / "teacher_rl" / "checkpoints").iterdir()) == old_ckpts
    assert json.loads((run / "stages" / "teacher_rl" / "lineage.json").read_text())["config_fields"]["steps"] == 3
    assert (run / "stages" / "fkl" / "COMPLETE").is_file()
    assert (run / "stages" / "student_rl" / "COMPLETE").is_file()  # not a descendant: kept as it was
    assert "job student_rl" not in r.stdout

    # item 9: a warmup killed after its teacher samples were cached but before its first checkpoint starts fresh;
    # re-run at another temperature it regenerates the cache (saying why) instead of training on top-k log-probs
    # recorded at the old temperature; with the same settings it reuses it
    fkl = run / "stages" / "fkl"
    header = json.loads((fkl / "teacher_cache" / "dp_rank_00000.json").read_text())
    assert header["provenance"]["temperature"] == 1.0 and header["provenance"]["dp"] == 1

    def crashed_after_generation():
        for name in ("COMPLETE", "lineage.json"):
            (fkl / name).unlink()
        shutil.rmtree(fkl / "checkpoints")

    crashed_after_generation()
    again = ("run", plan, "stage_defaults.save_every=1", "stages.teacher_rl.steps=3", "--stages", "fkl",
             "stages.fkl.rollout.temperature=0.7")
    r = s2d(*again)
    assert "teacher cache not used" in r.stdout and "temperature: 1.0 -> 0.7" in r.stdout, r.stdout
    assert json.loads((fkl / "teacher_cache" / "dp_rank_00000.json").read_text())["provenance"]["temperature"] == 0.7
    crashed_after_generation()
    r = s2d(*again)
    assert "teacher rollouts: cached" in r.stdout and "teacher cache not used" not in r.stdout, r.stdout


def test_dry_run_and_refused_run_leave_the_plan(mini_world, tmp_path):
    run, plan = _plan(mini_world, tmp_path)
    run.mkdir()
    live = run / "plan.resolved.yaml"
    live.write_text("# a running plan's resolved file\n")
    before = live.stat().st_mtime_ns
    r = s2d("run", plan, "stages.teacher_rl.optim.lr=0.5", "--dry-run")
    assert "dry run OK" in r.stdout
    assert live.read_text() == "# a running plan's resolved file\n" and live.stat().st_mtime_ns == before
    shown = yaml.safe_load((run / "dry_run" / "plan.resolved.yaml").read_text())
    assert next(s for s in shown["stages"] if s["name"] == "teacher_rl")["optim"]["lr"] == 0.5
    # a run refused for a bad setting (found by the launch checks) has not rewritten it either
    r = s2d("run", plan, "launch.nodes=2", check=False)
    assert r.returncode == 2 and "launch.nodes" in r.stderr
    assert live.read_text() == "# a running plan's resolved file\n"
    assert not (run / "stages").exists() and not (run / "models").exists()


def test_stopping_the_launcher_stops_the_job(mini_world, tmp_path, sig=signal.SIGINT):
    """Ctrl-C end to end (SIGTERM and SIGHUP take the same handler: tests/unit/launch/test_stop_request.py)."""
    run, plan = _plan(mini_world, tmp_path)
    proc = subprocess.Popen([s2d_console_script(), "run", str(plan), "--stages", "teacher_rl",
                             "stages.teacher_rl.steps=200"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if "step 2/200" in line or time.monotonic() > deadline:
            break
    assert any("step 2/200" in ln for ln in lines), "".join(lines)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=600)
    text = "".join(lines) + out
    assert proc.returncode == 128 + sig, text
    assert f"stopped by {signal.Signals(sig).name}" in text and "saved a checkpoint" in text, text
    assert (run / "stages" / "teacher_rl" / "checkpoints" / "latest").is_file()
    assert not (run / "stages" / "teacher_rl" / "COMPLETE").exists()
    assert "Traceback" not in text
    import psutil

    leftover = [p for p in psutil.process_iter(["cmdline"])
                if str(run) in " ".join(p.info["cmdline"] or []) and "stages.entry" in " ".join(p.info["cmdline"])]
    assert not leftover, leftover

