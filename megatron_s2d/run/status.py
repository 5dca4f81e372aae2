"""``s2d status RUN_DIR``: where each job of a run stands, read from the run folder alone.

    complete                      the stage's COMPLETE marker (written last by its job)
    running, step k of N          its LOCK names a live holder (pid on this host; another host's holder as stated)
    failed at step k of N         the last local job record says FAILED: its exit code, what it means, its log
    stopped at step k of N        progress on disk (a checkpoint, metrics) and no record of a failure
    not started                   nothing of it on disk

"step k" is the last step in ``metrics.jsonl``; a resume continues from the newest checkpoint (``checkpoints/latest``),
named when it is behind. Job records are torchx's: the local executor runs each job as one NeMo-Run experiment
under ``RUN/nemo_run/experiments/<plan>-<job>/``, and torchx writes a ``SUCCESS`` file into the job's log folder when
the job ends (its final state and every replica's exit code; torchx/schedulers/local_scheduler.py,
``_LocalAppDef.close``) next to ``<job>/0/combined.log``. SLURM jobs' exit codes are SLURM's (``sacct``).

Read-only: nothing is written and no lock is taken (a running launcher or job is untouched).
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from megatron_s2d.errors import S2DError, read_json, read_jsonl
from megatron_s2d.runtime.preemption import EXIT_PREEMPTED
from megatron_s2d.stages.layout import BASE_EVAL, RunLayout

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class JobRecord:
    """A job's latest local attempt: how it ended as torchx recorded it (``state`` SUCCEEDED / FAILED / ...; None
    while it runs, or when its launcher died before the job ended), its exit code and its log."""

    state: str | None
    exit_code: int | None
    log: Path | None


def read_job_record(path: Path) -> tuple[str, int | None]:
    """One torchx ``SUCCESS`` file: (final state, the first non-zero exit code of its replicas, else their 0)."""
    info = read_json(path, "it is torchx's record of a finished job: remove it (the job's log stays)")
    try:
        codes = [r["exitcode"] for rs in info["roles"].values() for r in rs if r.get("exitcode") is not None]
        state = str(info["final_state"])
    except (KeyError, TypeError, AttributeError) as e:
        raise S2DError(f"{path}: not a torchx job record (field {e}): remove it (the job's log stays)") from e
    failed = [c for c in codes if c != 0]
    return state, failed[0] if failed else (codes[0] if codes else None)


def _attempt_order(path: Path) -> tuple[int, float]:
    """NeMo-Run names an experiment folder ``<title>_<time in ns>``: newest last (the folder's mtime otherwise)."""
    suffix = path.name.rsplit("_", 1)[-1]
    return (int(suffix), 0.0) if suffix.isdigit() else (0, path.stat().st_mtime)


def last_job_record(layout: RunLayout, plan_name: str, job: str) -> JobRecord | None:
    """The latest local attempt of ``job`` (None: never run by the local executor)."""
    runs = layout.root / "nemo_run" / "experiments" / f"{plan_name}-{job}"
    attempts = sorted((p for p in runs.iterdir() if p.is_dir()), key=_attempt_order) if runs.is_dir() else []
    if not attempts:
        return None
    logs = sorted(attempts[-1].glob(f"{job}/nemo_run/*/*/*/combined.log"))
    records = sorted(attempts[-1].glob(f"{job}/nemo_run/*/SUCCESS"))
    state, code = read_job_record(records[-1]) if records else (None, None)
    return JobRecord(state, code, logs[-1] if logs else None)


def exit_meaning(code: int | None) -> str:
    """What a stage job's exit code says (``stages.entry``: 0 done, 2 bad input, 75 stopped with a checkpoint, 1 a
    crash; negative or above 128: killed by a signal, as Popen and the shell report it)."""
    if code is None:
        return "no exit code recorded"
    if code == EXIT_PREEMPTED:
        return f"exit code {code}: stopped by a signal after saving a checkpoint; re-run to resume"
    if code < 0 or code > 128:
        import signal

        sig = -code if code < 0 else code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"exit code {code}: killed by {name}, no checkpoint at the kill; re-run to resume from the last one"
    if code == 2:
        return "exit code 2: bad input; the log's last lines name the field or file to fix"
    return f"exit code {code}: the log's traceback says why"


@dataclass(frozen=True)
class StageStatus:
    name: str
    kind: str
    state: str  # complete | running | failed | stopped | not started
    step: int | None  # last step logged (metrics.jsonl)
    steps: int | None  # the plan's steps
    checkpoint_step: int | None  # newest checkpoint (what a resume continues from)
    detail: str  # holder, exit code and log, ...

    def line(self) -> str:
        """e.g. ``failed at step 3 of 10 (checkpoint at step 2): exit code 1: ...; log: ...``."""
        text = self.state
        k = self.step if self.step is not None else (self.checkpoint_step or 0)
        if self.state in ("running", "failed", "stopped") and (self.steps is not None or k):
            text += f" at step {k}" + (f" of {self.steps}" if self.steps is not None else "")
            if self.checkpoint_step is not None and self.checkpoint_step != k:
                text += f" (checkpoint at step {self.checkpoint_step})"
            elif self.checkpoint_step is None and k:
                text += " (no checkpoint yet: a resume starts over)"
        return text + (f": {self.detail}" if self.detail else "")


def _holder(lock: Path) -> str | None:
    """Who holds ``lock``, from what the holder wrote into it (emptied on release); None when nobody does. Read
    only: a holder on this host is checked by its pid; another host's is reported as its lock file states it."""
    try:
        info = json.loads(lock.read_text() or "{}") if lock.is_file() else {}
    except (OSError, ValueError):  # being rewritten by its holder this instant, or unreadable: not ours to judge
        return None
    if not isinstance(info, dict) or "pid" not in info:
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return None  # killed before it could empty its lock file: nobody runs it
        except PermissionError:
            pass  # alive, another user's
    return f"pid {info['pid']} on {info.get('host')} since {info.get('since')}"


def _checkpoint_step(layout: RunLayout, name: str) -> int | None:
    ptr = layout.checkpoints(name) / "latest"
    if not ptr.is_file():
        return None
    m = _STEP_DIR.match(ptr.read_text().strip())
    return int(m.group(1)) if m else None


def _last_step(layout: RunLayout, name: str) -> int | None:
    path = layout.stage(name) / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = read_jsonl(path, "restore it, or remove it: the stage rewrites it as it runs")
    steps = [m["step"] for m in lines if isinstance(m, dict) and isinstance(m.get("step"), int)]
    return max(steps) if steps else None


def stage_status(layout: RunLayout, plan_name: str, name: str, kind: str, steps: int | None,
                 launcher: str | None = None) -> StageStatus:
    """One job's status (``launcher``: the live holder of the run's lock, if any)."""
    step, ckpt = _last_step(layout, name), _checkpoint_step(layout, name)

    def status(state: str, detail: str = "") -> StageStatus:
        return StageStatus(name, kind, state, step, steps, ckpt, detail)

    if layout.is_complete(name):
        return status("complete")
    holder = _holder(layout.stage_lock(name))
    if holder is not None:
        return status("running", holder)
    record = last_job_record(layout, plan_name, name)
    log = f"; log: {record.log}" if record is not None and record.log else ""
    if record is not None and record.state is None and launcher is not None:
        return status("running", f"launcher {launcher}{log}")
    if record is not None and record.state not in (None, "SUCCEEDED"):
        state = "stopped" if record.exit_code == EXIT_PREEMPTED else "failed"
        return status(state, exit_meaning(record.exit_code) + log)
    if record is not None and record.state == "SUCCEEDED":
        return status("stopped", f"its job exited 0 without writing COMPLETE; re-run to resume{log}")
    if record is not None:
        return status("stopped", f"its launcher stopped before the job ended; re-run to resume{log}")
    if step is not None or ckpt is not None or layout.stage(name).is_dir():
        return status("stopped", "re-run to resume")
    return status("not started")


def run_status(run_dir: str | Path) -> tuple[dict, list[StageStatus]]:
    """(the resolved plan, each job's status in plan order: base_eval first when the plan evaluates the bases)."""
    import yaml

    layout = RunLayout.of(run_dir)
    if not layout.plan.is_file():
        raise S2DError(f"{layout.root}: no {layout.plan.name} there: not a run folder, or no run has started in it "
                       f"(`s2d run PLAN` writes it)")
    try:
        plan = yaml.safe_load(layout.plan.read_text()) or {}
        stages = [(s["name"], s["kind"], s.get("steps")) for s in plan.get("stages") or []]
        include_base = bool((plan.get("eval") or {}).get("include_base", False))
        name = str(plan["name"])
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise S2DError(f"{layout.plan}: damaged ({type(e).__name__}: {e}): restore it, or re-run `s2d run PLAN`, "
                       "which writes it") from e
    jobs = ([(BASE_EVAL, "base_eval", None)] if include_base else []) + stages
    launcher = _holder(layout.lock)
    return plan, [stage_status(layout, name, *job, launcher=launcher) for job in jobs]


def format_status(run_dir: str | Path, plan: dict, statuses: list[StageStatus]) -> str:
    layout = RunLayout.of(run_dir)
    executor = (plan.get("launch") or {}).get("executor", "local")
    head = [f"run {layout.root} (plan {plan.get('name')!r}, executor {executor})"]
    launcher = _holder(layout.lock)
    if launcher:
        head.append(f"launcher: {launcher}")
    if executor == "slurm":
        head.append("SLURM jobs: their exit codes and logs are SLURM's (sacct, the plan's launch.slurm.job_dir)")
    width = max((len(s.name) for s in statuses), default=5)
    kinds = max((len(s.kind) for s in statuses), default=4)
    rows = [f"  {s.name:<{width}}  {s.kind:<{kinds}}  {s.line()}" for s in statuses]
    done = sum(s.state == "complete" for s in statuses)
    return "\n".join(head + rows + [f"{done}/{len(statuses)} complete"])
