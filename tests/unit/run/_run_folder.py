"""A synthetic run folder in the on-disk formats of a real one, for ``s2d status`` / ``s2d report`` tests (no stage
runs): the resolved plan, COMPLETE markers, lineage / eval / metrics files, checkpoint pointers, and the local
launcher's job records as torchx writes them (the ``SUCCESS`` file of a job's log folder:
torchx/schedulers/local_scheduler.py ``_LocalAppDef.close``, the format a real failed job left in this repo's
launcher tests)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml

PLAN = "synth"
# (name, kind, steps)
STAGES = [("teacher_rl", "teacher_rl", 4), ("fkl", "fkl_warmup", 3), ("opd", "opd", 5), ("student_rl", "student_rl", 6),
          ("cold", "student_rl", 2), ("extra", "opd", 2)]


def job_record(run: Path, job: str, exit_code: int, attempt: int, state: str = "FAILED") -> Path:
    """One local attempt of ``job`` as NeMo-Run + torchx leave it: the experiment folder ``<plan>-<job>_<ns>``, the
    job's ``combined.log`` and torchx's ``SUCCESS`` record. Returns the log."""
    app = run / "nemo_run" / "experiments" / f"{PLAN}-{job}" / f"{PLAN}-{job}_{1796652671000000000 + attempt}" / job \
        / "nemo_run" / f"{job}-app{attempt}"
    replica = app / job / "0"
    replica.mkdir(parents=True)
    (replica / "combined.log").write_text(f"attempt {attempt} of {job}\n")
    (app / "SUCCESS").write_text(json.dumps({
        "app_id": app.name, "log_dir": str(app), "final_state": state, "last_updated": 1796652673.5,
        "roles": {job: [{"replica_id": 0, "pid": 8544, "exitcode": exit_code,
                         "stdout": str(replica / "stdout.log"), "stderr": str(replica / "stderr.log"),
                         "error_file": str(replica / "error.json")}]}}, indent=2))
    return replica / "combined.log"


def _metrics(d: Path, steps: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "reward_mean": 0.5}) + "\n"
                                             for k in range(1, steps + 1)))


def _checkpoint(d: Path, step: int) -> None:
    (d / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (d / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")


def synthetic_run(run: Path) -> dict[str, Path]:
    """teacher_rl complete (with lineage and eval), fkl failed at step 2 of 3 (exit 1; an older attempt exited 2),
    opd stopped at step 3 of 5 with a checkpoint at 2 (exit 75), student_rl running (its lock names this process),
    cold left a lock of a dead process and nothing else, extra never started. Returns the logs of fkl and opd."""
    run.mkdir(parents=True)
    plan = {"name": PLAN, "run_dir": str(run), "eval": {"include_base": True}, "launch": {"executor": "local"},
            "stages": [{"name": n, "kind": k, "steps": s} for n, k, s in STAGES]}
    (run / "plan.resolved.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    stages = run / "stages"
    base = stages / "base_eval"
    base.mkdir(parents=True)
    (base / "eval.json").write_text(json.dumps({"teacher_base": {"label": "teacher_base", "results": _ev(0.5)},
                                                "student_base": {"label": "student_base", "results": _ev(0.25)}}))
    (base / "COMPLETE").write_text("base models evaluated\n")
    t = stages / "teacher_rl"
    _metrics(t, 4)
    _checkpoint(t, 4)
    (t / "lineage.json").write_text(json.dumps({
        "stage": "teacher_rl", "kind": "teacher_rl", "control": None, "policy_model": "teacher",
        "parents": {"init": "base"}, "labels_used_by_lineage": ["1H"], "ledger": {"labels_consumed": 8},
        "ancestor_ledgers": {}, "steps": 4}))
    (t / "eval.json").write_text(json.dumps({"label": "teacher_rl", "results": _ev(0.75)}))
    (t / "COMPLETE").write_text(str(t / "checkpoints" / "step_000004") + "\n")
    f = stages / "fkl"
    _metrics(f, 2)
    _checkpoint(f, 2)
    job_record(run, "fkl", 2, attempt=1)
    logs = {"fkl": job_record(run, "fkl", 1, attempt=2)}
    o = stages / "opd"
    _metrics(o, 3)
    _checkpoint(o, 2)
    logs["opd"] = job_record(run, "opd", 75, attempt=1)
    s = stages / "student_rl"
    _metrics(s, 1)
    (s / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "user": "me",
                                        "slurm_job_id": None, "since": "2026-12-01 10:00:00", "command": "x"}))
    c = stages / "cold"
    c.mkdir()
    (c / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "user": "me",
                                        "since": "2026-12-01 09:00:00"}))
    return logs


def _ev(avg: float) -> dict:
    return {"toy-test": {"avg": avg, "stderr": 0.1, "n_problems": 4, "k": 2, "scores": [avg] * 4,
                         "problems": "abc"}}


def _dead_pid() -> int:
    """A pid no process has (a child that has exited and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its mode, mtime and content (files): equal snapshots, nothing written."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out
