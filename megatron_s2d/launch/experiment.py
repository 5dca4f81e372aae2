"""Plan a launch, then render it (``--dry-run``) or submit it (a run), with NeMo-Run: locally (torchrun, one job
after another) or on SLURM (dependent jobs).

    launch = plan_launch(plan, plan_path, stages, executor, JobSelection.run())     # jobs + pure checks, no effects
    render(plan, launch, out_dir)   # --dry-run: every job's script (SLURM: NeMo-Run's sbatch; local: the command)
    submit(plan, launch)            # a run: NeMo-Run experiments, launched
    launch_plan(...)                # the CLI's one call: plan, then render (dry_run) or submit

What a dry run selects differs from a run, explicitly (``JobSelection``): it also lists complete stages and does not
require the parents of a selected stage to be complete.

**SLURM** (``executor="slurm"``): one ``run.Experiment`` holding one task per job with ``dependencies`` on its
parents, so NeMo-Run submits them at once as ``afterok``-chained sbatch jobs and returns (``detach``).

**Local** (``executor="local"``): one ``run.Experiment`` per job, run one after another with ``run.LocalExecutor``
(torchrun via :mod:`megatron_s2d.launch.agent` for ``launch.procs_per_node`` > 1 processes; one process runs the
stage entry directly), output tailed to the terminal.
Why not one experiment with dependencies: NeMo-Run's local DAG runner launches every job of a topological
generation at once (``teacher_rl`` and ``cold_grpo`` would share the 2 CPU cores) and keeps launching dependents
after a parent failed (it only logs the failure). Running one experiment per job lets the launcher stop at the first
failing job with a non-zero exit naming the job and its log file, and check each stage's ``COMPLETE`` marker.
Measured on 2 CPU cores: ``import nemo_run`` 3-10 s once per launch (cold cache: ~10 s); ~2 s per job of NeMo-Run's
own (a trivial job: 2.1 s through NeMo-Run vs 0.05 s bare; it polls job state every 2 s). The larger per-job cost is
torchrun + torch imports in the agent and workers (~8-10 s per job at 2 processes), with or without NeMo-Run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from megatron_s2d.config.schema import PlanConfig
from megatron_s2d.errors import S2DError
import megatron_s2d.launch.slurm as slurm_mod
from megatron_s2d.launch.checks import JobCheck, MemoryBudgetError, check_jobs, format_table
from megatron_s2d.launch.jobs import Job, job_command, plan_jobs
from megatron_s2d.stages.layout import RunLayout
from megatron_s2d.runtime.preemption import EXIT_PREEMPTED

LOCAL_ENV = {"PYTHONUNBUFFERED": "1"}
VERBOSE_ENV = {"S2D_VERBOSE": "1"}  # the stage entry then leaves library warnings on (``stages.entry._quiet``)


@dataclass(frozen=True)
class JobSelection:
    """Which jobs a launch takes: complete stages too (a dry run shows every job), whether a selected stage's
    parents must already be complete when not launched with it (a run needs their checkpoints), the report job."""

    include_complete: bool
    require_parents: bool
    report: bool | None = None  # None: on SLURM only (after a local run the CLI writes the report in-process)

    @staticmethod
    def run(report: bool | None = None) -> "JobSelection":
        return JobSelection(include_complete=False, require_parents=True, report=report)

    @staticmethod
    def dry_run(report: bool | None = None) -> "JobSelection":
        return JobSelection(include_complete=True, require_parents=False, report=report)


@dataclass
class PlannedRun:
    """A planned launch: its jobs and their checks; after ``submit`` the NeMo-Run experiments (SLURM: one with every
    job; local: one per job), after ``render`` the scripts."""

    executor: Literal["local", "slurm"]
    jobs: list[Job]
    checks: list[JobCheck]
    plan_path: str = ""
    experiments: list = field(default_factory=list)
    scripts: dict[str, str] = field(default_factory=dict)  # dry run: job -> rendered script path


def _local_command(plan: PlanConfig, job: Job, plan_path: str) -> tuple[str, list[str]]:
    """A local job's (module, args): one process runs the stage entry directly, more run under torchrun."""
    procs = plan.launch.procs_per_node
    return job_command(job, plan_path, str(RunLayout.of(plan.run_dir).root), 1, procs, agent=procs > 1)


def _local_script(plan: PlanConfig, job: Job, plan_path: str):
    run = slurm_mod.load_nemo_run()
    module, args = _local_command(plan, job, plan_path)
    return run.Script(path=module, m=True, entrypoint=sys.executable, args=args)


def _local_experiment(plan: PlanConfig, job: Job, plan_path: str, verbose: bool = False):
    run = slurm_mod.load_nemo_run()
    exp = run.Experiment(f"{plan.name}-{job.name}", base_dir=str(RunLayout.of(plan.run_dir).root / "nemo_run"),
                         enable_goodbye_message=False, skip_status_at_exit=True,
                         log_level="INFO" if verbose else "WARNING")
    env = {**LOCAL_ENV, **(VERBOSE_ENV if verbose else {})}
    with exp:
        exp.add(_local_script(plan, job, plan_path), executor=run.LocalExecutor(ntasks_per_node=1, env_vars=env),
                name=job.name, tail_logs=True)
    return exp


def _write_local_scripts(plan: PlanConfig, jobs: list[Job], plan_path: str, out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for job in jobs:
        module, args = _local_command(plan, job, plan_path)
        env = " ".join(f"{k}={v}" for k, v in LOCAL_ENV.items())
        text = (f"#!/bin/bash\n# megatron-s2d dry run of job {job.name!r} (local executor: NeMo-Run LocalExecutor)\n"
                f"# waits for: {', '.join(job.deps) or 'nothing'}\n"
                f"{env} {shlex.join([sys.executable, '-m', module, *args])}\n")
        path = out_dir / f"{job.name}.sh"
        path.write_text(text)
        paths[job.name] = str(path)
    return paths


def plan_launch(plan: PlanConfig, plan_path_resolved: str, stages: list[str] | None,
                executor: Literal["local", "slurm"], selection: JobSelection) -> PlannedRun:
    """Select the jobs and run every check that needs no cluster (layouts, memory, the SLURM profile); no side
    effects. Raises :class:`S2DError` naming every problem."""
    if executor not in ("local", "slurm"):
        raise S2DError(f"executor {executor!r}: expected 'local' or 'slurm'")
    report = executor == "slurm" if selection.report is None else selection.report
    remote = executor == "slurm" and plan.launch.slurm.tunnel == "ssh"  # a path on the cluster: keep it as given
    plan_path = plan_path_resolved if remote else str(Path(plan_path_resolved).resolve())
    if remote and not Path(plan_path_resolved).is_absolute():
        raise S2DError(f"plan path {plan_path_resolved!r} must be absolute (a path on the cluster) for an ssh tunnel")
    if executor == "slurm":
        slurm_mod.check_slurm_config(plan)
    elif plan.launch.nodes != 1:
        raise S2DError(f"launch.nodes = {plan.launch.nodes}: the local executor runs on one node (use --executor "
                       f"slurm, or launch.nodes=1)")
    jobs = plan_jobs(plan, stages, include_complete=selection.include_complete, report=report,
                     check_parents=selection.require_parents)
    return PlannedRun(executor, jobs, check_jobs(plan, jobs), plan_path)


def render(plan: PlanConfig, planned: PlannedRun, out_dir: Path) -> dict[str, str]:
    """Write every job's script to ``out_dir`` (SLURM: NeMo-Run's sbatch; local: the command line)."""
    if planned.executor == "slurm":
        planned.scripts = slurm_mod.render_sbatch(plan, planned.jobs, planned.plan_path, out_dir)
    else:
        planned.scripts = _write_local_scripts(plan, planned.jobs, planned.plan_path, out_dir)
    return planned.scripts


def _experiments(plan: PlanConfig, planned: PlannedRun, verbose: bool = False) -> list:
    if planned.executor == "slurm":
        run = slurm_mod.load_nemo_run()
        exp = run.Experiment(plan.name, base_dir=slurm_mod.experiment_base_dir(plan), enable_goodbye_message=False)
        with exp:
            slurm_mod.add_jobs(exp, plan, planned.jobs, planned.plan_path)
        return [exp]
    return [_local_experiment(plan, job, planned.plan_path, verbose) for job in planned.jobs]


def _log_file(nr_job) -> str:
    logs = sorted(Path(nr_job.executor.job_dir).glob("**/combined.log"))
    return str(logs[-1]) if logs else nr_job.executor.job_dir


# ------------------------------------------------------------------------------------------ the console of a local run
# Without --verbose the terminal shows progress, results and errors: library noise in the jobs' tailed output is
# dropped here (the job's log file keeps every line), NeMo-Run's own panels and INFO lines go to a buffer that is
# shown when a job fails with an error in it. --verbose shows everything as the libraries print it.
_TORCHX_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?[^\s/]{1,10}/\d+(?:\x1b\[0m)? ")  # "teacher_rl/0 " on tailed lines
_WARNING = re.compile(r"^(?P<path>\S+?):\d+: (?:\w+\.)*\w*Warning: ")  # a Python warning's first line
_LIBRARY_PATH = re.compile(r"site-packages|dist-packages|^<frozen |/lib/python3\.\d+/")
_NOISE = re.compile("|".join((
    r"^[IWD]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ",  # torch / torchrun (glog format) I/W/D; E/F stay
    r"^\[[IWD]\d{4} \d\d:\d\d:\d\d[.\d]* ",  # torch C++ (c10d) I/W/D lines
    r"^(?:\([\w-]+ pid=\d+\) )?(?:INFO|WARNING|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d ",  # vLLM
    r"^(?:INFO|WARNING|DEBUG):[\w.]+:",  # Python logging's default format (torch.distributed.elastic, ...)
    r"^wandb: (?!ERROR)",  # W&B's banner (the stage prints one line naming its W&B run)
)))
_STEP = re.compile(r"^\[(?P<stage>[^\]\s]+)\] step (?P<k>\d+)/(?P<n>\d+)(?=\s|$)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _step_times(path: Path, last: int = 20) -> list[float]:
    """The measured step times (``step_time_s``) of a stage's last steps in its metrics.jsonl."""
    try:
        lines = path.read_text().splitlines()[-last:]
        return [float(json.loads(ln)["step_time_s"]) for ln in lines if ln.strip() and "step_time_s" in ln]
    except (OSError, ValueError, KeyError):
        return []


class ConsoleFilter:
    """Stands in for ``sys.stdout`` while NeMo-Run tails a local job: drops library noise (unless ``verbose``) and the
    ``<role>/0`` prefix, and adds the stage's time elapsed and estimated time left (the mean of its measured step
    times x the steps to go) to each ``[stage] step k/N ...`` line. Every other line (tracebacks, errors, our own
    warnings) passes unchanged."""

    def __init__(self, stream: TextIO, layout: RunLayout, verbose: bool = False):
        self.stream, self.layout, self.verbose = stream, layout, verbose
        self.started = time.monotonic()
        self._partial, self._after_warning = "", False
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            if self._partial and (_TORCHX_PREFIX.match(text) or ("\r" in self._partial and text[:1] not in "\r\n")):
                # a new line (tailed, or the launcher's own) starts while another stream's unfinished line is
                # pending (a progress bar: its updates start with "\r" and it never writes "\n"): end that one
                # first, so the two do not run into one line
                text = "\n" + text
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                shown = self.filter_line(line)
                if shown is not None:
                    self.stream.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Write out an unfinished last line (the wrapped stream stays open)."""
        with self._lock:
            rest, self._partial = self._partial, ""
        if rest:
            shown = self.filter_line(rest)
            if shown is not None:
                self.stream.write(shown)
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the terminal
        return getattr(self.stream, name)

    def filter_line(self, line: str) -> str | None:
        """The line as shown, or None when it is dropped."""
        text = "\r".join(_TORCHX_PREFIX.sub("", seg, count=1) for seg in line.split("\r"))
        after_warning, self._after_warning = self._after_warning, False
        if not self.verbose:
            if after_warning and text[:1].isspace():
                return None  # the source line under a dropped warning
            warning = _WARNING.match(text)
            if warning and _LIBRARY_PATH.search(warning["path"]):
                self._after_warning = True
                return None
            if _NOISE.match(text):
                return None
        step = _STEP.match(text)
        shown = line if self.verbose else text
        if step:
            shown += " | " + self.timing(step["stage"], int(step["k"]), int(step["n"]))
        return shown

    def timing(self, stage: str, k: int, n: int) -> str:
        out = f"{_hms(time.monotonic() - self.started)} elapsed"
        times = _step_times(self.layout.stage(stage) / "metrics.jsonl")
        if k < n and times:
            out += f", ~{_hms(sum(times) / len(times) * (n - k))} left"
        return out


@contextlib.contextmanager
def _nemo_run_console(verbose: bool):
    """Quiet: NeMo-Run's rich console (experiment panels, "Launching job", its log lines) writes to a buffer, yielded
    (shown when a job fails with an error in it); verbose: to the terminal, as NeMo-Run prints it."""
    if verbose:
        yield None
        return
    from nemo_run.core.frontend.console.api import CONSOLE

    buf, saved = io.StringIO(), CONSOLE._file
    CONSOLE.file = buf
    try:
        yield buf
    finally:
        CONSOLE.file = saved


@contextlib.contextmanager
def _filtered_stdout(layout: RunLayout, verbose: bool):
    saved = sys.stdout
    sys.stdout = filt = ConsoleFilter(saved, layout, verbose)
    try:
        yield filt
    finally:
        sys.stdout = saved
        filt.close()


# ------------------------------------------------------------------------------------------ stopping a local run
# Ctrl-C (SIGINT), `kill` (SIGTERM) or a closed terminal (SIGHUP) of the launcher stop the running job the way SLURM's
# SIGTERM does: the stage saves a checkpoint and exits 75, and the launcher then exits 128 + the signal's number.
# The job cannot see the launcher's signal by itself: torchx starts it in a session of its own
# (torchx/schedulers/local_scheduler.py, ``Popen(..., start_new_session=True)``), so a terminal's Ctrl-C never
# reaches it, and NeMo-Run's ``Experiment.__exit__`` then waits for the job to finish (nemo_run/run/experiment.py,
# ``_wait_for_jobs`` in ``__exit__``): the launcher used to sit there while the job trained to its end.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The handler acts at once instead of raising: an exception raised in the launcher's main thread cannot end the wait,
# because NeMo-Run waits inside ``with ThreadPoolExecutor()`` (``Experiment._wait_for_jobs``), whose ``__exit__``
# joins the waiting thread until the job ends, whatever the exception.


class LaunchStopped(S2DError):
    """The launcher was told to stop; the running job saved a checkpoint (or was killed). ``exit_code`` is
    128 + the signal's number, as a shell reports a process a signal stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _job_processes() -> list:
    """The stage-entry processes among this launcher's descendants (the job's ranks; not torchrun's agent, not the
    reward workers or other helpers the ranks started)."""
    import psutil

    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "megatron_s2d.stages.entry" in cmd and "megatron_s2d.launch.agent" not in cmd:
            procs.append(p)
    return procs


def _job_trees() -> list:
    """The job's processes with everything they started: each child of this launcher that runs the stage entry
    (directly, or torchrun's agent with it as its script), and their descendants (ranks, reward workers, vLLM)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=False):
        try:
            if "megatron_s2d.stages.entry" in " ".join(child.cmdline()):
                out += [child] + child.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _say(text: str) -> None:
    """Write from a signal handler: straight to the terminal's file descriptor (the console filter's lock may be
    held by the thread the signal interrupted)."""
    os.write(sys.__stderr__.fileno(), (text + "\n").encode())


class StopRequest:
    """The launcher's SIGINT / SIGTERM / SIGHUP handler while a local job runs: the first signal sends SIGTERM to
    the job's ranks (each saves a checkpoint and exits 75: ``runtime.preemption``); a ranks-to-be that has not
    started yet gets it as soon as it appears; a second signal kills the job's whole process tree."""

    def __init__(self, job_name: str):
        self.job_name, self.signum, self.killed = job_name, None, False

    def __call__(self, signum, frame=None) -> None:
        import psutil

        if self.signum is not None:
            self.killed = True
            _say(f"[s2d] {signal.Signals(signum).name} again: killing job {self.job_name!r} without a checkpoint")
            for p in _job_trees():
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            return
        self.signum = signum
        _say(f"[s2d] {signal.Signals(signum).name}: stopping job {self.job_name!r}: it saves a checkpoint and exits "
             f"(press Ctrl-C again to kill it without one)")
        ranks = _job_processes()
        if ranks:
            self._terminate(ranks)
        else:  # still starting: terminate it as soon as it is there
            threading.Thread(target=self._terminate_when_started, daemon=True).start()

    @staticmethod
    def _terminate(ranks) -> None:
        import psutil

        for p in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)

    def _terminate_when_started(self, wait_s: float = 300.0) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not self.killed:
            ranks = _job_processes()
            if ranks:
                time.sleep(1.0)  # let the entry install its SIGTERM handler (``stages.entry``: first thing it does)
                self._terminate(_job_processes())
                return
            time.sleep(0.2)

    def message(self, layout: RunLayout) -> str:
        ptr = layout.checkpoints(self.job_name) / "latest"
        where = f"its latest checkpoint is {ptr.read_text().strip()}" if ptr.is_file() else "it has no checkpoint yet"
        what = "was killed" if self.killed else "saved a checkpoint and stopped"
        return (f"stopped by {signal.Signals(self.signum).name}: job {self.job_name!r} {what} ({where}). Re-run the "
                f"same command to resume")


@contextlib.contextmanager
def _stop_handlers(request: StopRequest):
    """Install ``request`` for the stop signals while a job runs (main thread only: elsewhere nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, request) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _poll_quickly(exp, interval_s: float = 0.2) -> None:
    """NeMo-Run waits for a local job with ``runner.wait(handle, wait_interval=2)`` (nemo_run/run/torchx_backend/
    launcher.py:160, hard-coded): the launcher noticed a finished job 1 s late on average, up to 2 s (a plan of 21
    jobs: ~20 s). The experiment's runner (``Experiment._runner``, the one ``_wait_for_jobs`` passes a LocalExecutor's
    jobs) polls every ``interval_s`` instead; a local job's status is a ``Popen.poll()`` (torchx
    schedulers/local_scheduler.py), so polling often costs nothing."""
    runner = exp._runner
    real = runner.wait

    def wait(app_handle, wait_interval: float = 10):
        return real(app_handle, wait_interval=min(wait_interval, interval_s))

    runner.wait = wait


def _run_local(plan: PlanConfig, planned: PlannedRun, out: TextIO, verbose: bool = False,
               nemo_run_output: io.StringIO | None = None) -> None:
    """Run the per-job experiments one after another; stop at the first failure with an error naming job and log;
    a stop signal to the launcher stops the running job with a checkpoint (:class:`StopRequest`) and raises
    :class:`LaunchStopped`."""
    layout = RunLayout.of(plan.run_dir)
    plan_started, n = time.monotonic(), len(planned.jobs)
    for i, (job, exp) in enumerate(zip(planned.jobs, planned.experiments)):
        so_far = (f", {_hms(time.monotonic() - plan_started)} into the plan" if i else "")
        print(f"[s2d] ===== job {i + 1}/{n}: {job.name} ({job.kind}){so_far} =====", file=out, flush=True)
        mark = nemo_run_output.tell() if nemo_run_output is not None else 0
        stop = StopRequest(job.name)
        with _stop_handlers(stop):
            with _filtered_stdout(layout, verbose) as filt, exp:
                _poll_quickly(exp)
                exp.run(tail_logs=True)
        if stop.signum is not None:
            raise LaunchStopped(stop.message(layout), stop.signum)
        nr_job = exp.jobs[0]
        state = str(getattr(nr_job.state, "name", nr_job.state))
        if state != "SUCCEEDED":
            said = _ANSI.sub("", nemo_run_output.getvalue()[mark:]) if nemo_run_output is not None else ""
            if re.search(r"error|exception|traceback", said, re.IGNORECASE):
                print(f"[s2d] NeMo-Run's output for job {job.name}:\n{said.rstrip()}", file=out, flush=True)
            hint = _exit_hint(job, nr_job)
            raise S2DError(f"job {job.name!r} failed ({state}); log: {_log_file(nr_job)}{hint}")
        if job.kind != "report" and not layout.is_complete(job.name):
            raise S2DError(f"job {job.name!r} exited cleanly but {layout.complete_marker(job.name)} was not written "
                           f"(stopped early?); log: {_log_file(nr_job)}; re-run to resume")
        print(f"[s2d] job {job.name} done in {_hms(time.monotonic() - filt.started)}", file=out, flush=True)


def _exit_hint(job: Job, nr_job) -> str:
    """What the job's exit code says (``run.status.exit_meaning``: 75 is a checkpointed stop, a signal is named), read
    from the record torchx writes when it closes a local job (``SUCCESS`` in the job's log folder)."""
    from megatron_s2d.run.status import exit_meaning, read_job_record

    if job.kind == "report":
        return ""
    found = sorted(Path(nr_job.executor.job_dir).glob("**/SUCCESS"))
    code = None
    if found:
        with contextlib.suppress(S2DError):
            code = read_job_record(found[-1])[1]
    return f" ({exit_meaning(code)})" if code is not None else ""


def submit(plan: PlanConfig, planned: PlannedRun, out: TextIO, detach: bool = True,
           verbose: bool = False) -> PlannedRun:
    """Launch the planned jobs. Local runs block until every job finished and raise :class:`S2DError` at the first
    failure; SLURM runs submit every job and return (``detach``) or wait for them."""
    if not planned.jobs:
        print("[s2d] nothing to run: every selected stage is complete", file=out, flush=True)
        return planned
    if planned.executor == "local":
        with _nemo_run_console(verbose) as nemo_run_output:
            planned.experiments = _experiments(plan, planned, verbose)
            _run_local(plan, planned, out, verbose, nemo_run_output)
        return planned
    planned.experiments = _experiments(plan, planned)
    exp = planned.experiments[0]
    if plan.launch.slurm.tunnel == "ssh":  # the jobs read the plan from the cluster's filesystem
        tunnel = exp.jobs[0].executor.tunnel
        tunnel.connect()
        tunnel.run(f"mkdir -p {shlex.quote(str(Path(planned.plan_path).parent))}")
        tunnel.put(planned.plan_path, planned.plan_path)
    with exp, slurm_mod.no_stdin():
        exp.run(detach=detach)
    print(f"[s2d] submitted {len(planned.jobs)} SLURM job(s): {', '.join(j.name for j in planned.jobs)}", file=out,
          flush=True)
    return planned


def launch_plan(plan: PlanConfig, plan_path_resolved: str, stages: list[str] | None = None,
                executor: Literal["local", "slurm"] | None = None, dry_run: bool = False, detach: bool = True,
                report: bool | None = None, out: TextIO | None = None, verbose: bool = False) -> PlannedRun:
    """Plan the launch of ``stages`` (None: the whole plan), then render it (``dry_run``: scripts + the table, nothing
    launched) or submit it. The plan must already be written to ``plan_path_resolved`` (a path every job can read:
    on SLURM, on the shared filesystem). ``executor``: None uses ``plan.launch.executor``."""
    out = out or sys.stdout
    executor = executor or plan.launch.executor
    if dry_run:
        try:
            planned = plan_launch(plan, plan_path_resolved, stages, executor, JobSelection.dry_run(report))
        except MemoryBudgetError as e:  # every layout is valid: show the table, over-budget peaks flagged, then fail
            print(format_table(e.checks, {}), file=out, flush=True)
            raise
        out_dir = RunLayout.of(plan.run_dir).root / "dry_run"
        render(plan, planned, out_dir)
        print(format_table(planned.checks, planned.scripts), file=out, flush=True)
        if executor == "slurm":
            interp, code, why = slurm_mod.job_environment(plan)
            print(f"[s2d] SLURM jobs run {interp} ({why}); megatron-s2d code: {code}", file=out, flush=True)
        print(f"[s2d] dry run OK: {len(planned.jobs)} job(s), scripts in {out_dir}", file=out, flush=True)
        return planned
    planned = plan_launch(plan, plan_path_resolved, stages, executor, JobSelection.run(report))
    return submit(plan, planned, out, detach, verbose)


def run_plan(plan: PlanConfig, plan_path_resolved: str, stages: list[str] | None = None,
             executor: Literal["local", "slurm"] | None = None, dry_run: bool = False,
             report: bool | None = None, verbose: bool = False) -> int:
    """CLI form of :func:`launch_plan`: returns 0 when every job succeeded (local) or was submitted (SLURM);
    failures raise :class:`S2DError` (the message names the job and its log file)."""
    launch_plan(plan, plan_path_resolved, stages, executor, dry_run, report=report, verbose=verbose)
    return 0


def dry_run(plan: PlanConfig, source: str | None = None, stages: list[str] | None = None,
            executor: str | None = None, out=None) -> int:
    """``s2d run --dry-run``: validate every job, render its script under ``<run_dir>/dry_run/`` with
    ``--plan <run_dir>/plan.resolved.yaml`` as a real run would, and print the table. ``source``: the plan file the
    user gave (only named in the output)."""
    out = out or sys.stdout
    if source:
        print(f"[s2d] dry run of {source} (plan {plan.name!r})", file=out, flush=True)
    launch_plan(plan, str(RunLayout.of(plan.run_dir).plan), stages, executor, dry_run=True, out=out)
    return 0
