"""NeMo-Run Slurm executors for the jobs of a plan, and sbatch rendering for dry runs (NeMo-Run's own template).

Every stage job is one ``sbatch`` (NeMo-Run's ``slurm.sh.j2``) with

* ``--nodes`` = ``launch.nodes``, ``--gpus-per-node`` = ``launch.slurm.gpus_per_node``, one task per node running
  ``python -m megatron_s2d.launch.agent`` (torchrun with ``--nproc-per-node launch.procs_per_node``; multi-node jobs
  rendezvous on the first node, ``$head_node_ip`` which the template resolves);
* ``--account``, ``--partition``, ``--time``, ``--mem``, ``--exclusive`` from ``launch.slurm``; container image and
  mounts (pyxis ``srun --container-image/--container-mounts``) and ``export`` lines for ``launch.slurm.env``;
* ``--signal=USR1@<signal_seconds_before_end>`` (the stage saves and requeues, see
  :mod:`megatron_s2d.runtime.preemption`) and ``--requeue`` (NeMo-Run also submits with ``sbatch --requeue``);
* ``--dependency=afterok:<parent job ids>``: NeMo-Run passes it on the ``sbatch`` command line when it submits (the
  ids exist only then); dry-run scripts carry it in the file with placeholders ``<stage>`` for the ids;
  ``--kill-on-invalid-dep=yes`` cancels the dependents of a failed job.

The interpreter (:func:`job_environment`): without a container image the job runs the interpreter that ran ``s2d``
(``sys.executable``, an absolute path: the virtual environment megatron-s2d is installed in, the usual set-up on a
bare-metal cluster with a shared filesystem), or ``launch.slurm.python`` when the cluster profile sets one (required
with an ssh tunnel: the local interpreter is not on the cluster); a bare ``python`` would be whatever the compute
node's PATH finds, without megatron-s2d. With a container image it is the container's ``python`` unless the profile
sets one. The code is not shipped by NeMo-Run (``run.Packager()``): the interpreter must import megatron-s2d (an
install or editable install on the shared filesystem, or ``PYTHONPATH`` in ``launch.slurm.env``). With a local tunnel
and no container, the launcher checks that before anything is submitted (it runs the interpreter in the job's
environment); the dry run and the rendered sbatch header say which interpreter and which code folder the jobs use.
``run_dir`` must be on a filesystem every node sees, at the same path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_s2d.config.schema import PlanConfig, SlurmConfig
from megatron_s2d.errors import S2DError
from megatron_s2d.launch.jobs import Job, job_command

REPORT_TIME = "01:00:00"
DEFAULT_ENV = {"PYTHONUNBUFFERED": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def load_nemo_run():
    """``import nemo_run`` with an actionable error (it is a launcher-only dependency)."""
    try:
        import nemo_run
    except ImportError as e:
        raise S2DError(f"cannot import nemo_run ({e}); install nemo-run==0.11.1. If the error names "
                       f"'leptonai.api.v1', pin leptonai<0.47 (nemo-run 0.11.1 imports an API that 0.47 "
                       f"removed)") from e
    return nemo_run


@contextlib.contextmanager
def no_stdin() -> Iterator[None]:
    """Give NeMo-Run's shell-outs (invoke forwards our stdin to every command) /dev/null as stdin: a closed or
    captured stdin (nohup, CI, pytest) otherwise makes its ``mkdir``/``sbatch`` calls fail."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


_PROBE = ("import os, megatron_s2d; "
          "print(os.path.dirname(os.path.dirname(os.path.realpath(megatron_s2d.__file__))))")


def _expand(value: str, env: dict[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` expanded like the job's ``export KEY=VALUE`` lines would (unset: empty)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def job_env_vars(s: SlurmConfig) -> dict[str, str]:
    """The environment a job without a container runs in: sbatch exports the submitting one (``s2d``'s) and srun
    passes it on; the script then exports :data:`DEFAULT_ENV` and ``launch.slurm.env`` in that order."""
    env = dict(os.environ)
    for key, value in {**DEFAULT_ENV, **s.env}.items():
        env[key] = _expand(str(value), env)
    return env


@functools.lru_cache(maxsize=8)
def _probe_import(interp: str, env_items: tuple[tuple[str, str], ...]) -> tuple[str | None, str]:
    """(folder ``megatron_s2d`` is imported from, why not) for ``interp`` run like a job: that environment and an empty
    working directory (the job's is NeMo-Run's empty ``code`` folder, so a checkout in the cwd does not count)."""
    with tempfile.TemporaryDirectory(prefix="s2d_probe_") as cwd:
        try:
            proc = subprocess.run([interp, "-c", _PROBE], cwd=cwd, env=dict(env_items), capture_output=True,
                                  text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return None, ""  # could not tell (a very slow filesystem): not an error
        except OSError as e:
            return None, f"{type(e).__name__}: {e}"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        return None, err[-1] if err else f"exit code {proc.returncode}"
    return lines[-1], ""


def job_environment(plan: PlanConfig) -> tuple[str, str, str]:
    """(interpreter, code folder, note) of the plan's SLURM jobs: the interpreter their ``srun`` runs, where it
    imports ``megatron_s2d`` from, and why that interpreter (see the module docstring). Raises :class:`S2DError` when
    the jobs could not start: a relative interpreter; with an ssh tunnel and no container, no ``launch.slurm.python``;
    with a local tunnel and no container (this machine sees the nodes' shared filesystem), an interpreter that does
    not exist or cannot import megatron_s2d in the job's environment (the job would die at once with
    ``No module named 'megatron_s2d'``). Inside a container or on a remote cluster nothing can be checked from here."""
    s = plan.launch.slurm
    remote = s.tunnel == "ssh"
    if s.python:
        interp, note = s.python, "launch.slurm.python"
        if not os.path.isabs(interp) and interp != "python":
            raise S2DError(f"launch.slurm.python = {interp!r} must be an absolute path (or 'python' for the one on "
                           "the compute node's PATH)")
    elif s.container_image:
        interp, note = "python", f"the container's, {s.container_image}"
    elif remote:
        raise S2DError("launch.slurm.python is required with an ssh tunnel and no container image: the interpreter "
                       "that runs s2d here is not on the cluster; set it to the cluster's venv python (absolute path)")
    else:
        interp, note = sys.executable, "the interpreter running s2d, i.e. its virtual environment"
        if not interp or not os.path.isabs(interp):
            raise S2DError(f"cannot tell which interpreter runs s2d (sys.executable = {interp!r}); set "
                           "launch.slurm.python to the absolute path of the python the SLURM jobs should run")
    pythonpath = s.env.get("PYTHONPATH")
    if s.container_image:
        return interp, (f"inside the container (not checked here; PYTHONPATH={pythonpath})" if pythonpath else
                        "inside the container (not checked here)"), note
    if remote:
        return interp, "on the cluster (not checked from here)", note
    env = job_env_vars(s)
    if interp == "python":
        found = shutil.which("python", path=env.get("PATH"))
        note += f"; the PATH s2d exports finds {found}" if found else "; not on the PATH s2d exports"
    elif not (os.path.isfile(interp) and os.access(interp, os.X_OK)):
        raise S2DError(f"the SLURM jobs' interpreter {interp} ({note}) does not exist or is not executable")
    code, err = _probe_import(interp, tuple(sorted(env.items())))
    if err:
        raise S2DError(f"the SLURM jobs' interpreter {interp} ({note}) cannot import megatron_s2d in the jobs' "
                       f"environment ({err}): every job would die at once. Install megatron-s2d into it "
                       "(pip install -e <checkout>), set launch.slurm.python to one that has it, or put the checkout "
                       "on PYTHONPATH in launch.slurm.env")
    if code is None:
        return interp, "not checked (the interpreter did not answer in 120 s)", note
    kind = "a source checkout" if (Path(code) / "pyproject.toml").is_file() else "an installed package"
    return interp, f"{code} ({kind})", note


def check_slurm_config(plan: PlanConfig) -> None:
    s = plan.launch.slurm
    if s.gpus_per_node < 0:
        raise S2DError(f"launch.slurm.gpus_per_node = {s.gpus_per_node} must be >= 0 (0: CPU nodes, no GPU request)")
    if s.gpus_per_node and plan.launch.procs_per_node > s.gpus_per_node:
        raise S2DError(f"launch.procs_per_node = {plan.launch.procs_per_node} exceeds launch.slurm.gpus_per_node = "
                       f"{s.gpus_per_node}: one torchrun process per GPU")
    if s.tunnel == "ssh" and not (s.host and s.user):
        raise S2DError("launch.slurm.tunnel = 'ssh' needs launch.slurm.host and launch.slurm.user")
    if s.tunnel == "ssh" and not os.path.isabs(s.job_dir):
        raise S2DError(f"launch.slurm.job_dir = {s.job_dir!r} must be an absolute path on the cluster for an ssh "
                       f"tunnel")
    if s.tunnel == "ssh" and not os.path.isabs(plan.run_dir):
        raise S2DError(f"run_dir = {plan.run_dir!r} must be an absolute path on the cluster's shared filesystem "
                       f"for an ssh tunnel")
    if s.signal_seconds_before_end < 0:
        raise S2DError("launch.slurm.signal_seconds_before_end must be >= 0")
    job_environment(plan)


def local_job_dir(s: SlurmConfig) -> str:
    return os.path.abspath(os.path.expanduser(s.job_dir))


def experiment_base_dir(plan: PlanConfig) -> str:
    """Where NeMo-Run keeps the experiment on this machine.

    With a local tunnel the sbatch scripts are submitted from the tunnel's job dir without copying, which NeMo-Run
    derives as ``<job_dir>/experiments/<title>/<id>`` exactly like the experiment dir under ``base_dir``: so both
    are ``launch.slurm.job_dir``. With ssh the experiment is rsynced to the cluster; locally it lives in run_dir.
    """
    s = plan.launch.slurm
    if s.tunnel == "local":
        return local_job_dir(s)
    return str(Path(plan.run_dir).resolve() / "nemo_run")


def make_tunnel(s: SlurmConfig):
    """A fresh tunnel (NeMo-Run mutates a tunnel's job_dir per experiment, so never share one between executors)."""
    run = load_nemo_run()
    if s.tunnel == "ssh":
        return run.SSHTunnel(host=s.host, user=s.user, job_dir=s.job_dir)
    return run.LocalTunnel(job_dir=os.path.join(local_job_dir(s), "experiments"))


def slurm_executor(plan: PlanConfig, job: Job):
    """The ``run.SlurmExecutor`` of one job (stage jobs get GPUs, signal and requeue; the report job one CPU node)."""
    run = load_nemo_run()
    s = plan.launch.slurm
    env = {**DEFAULT_ENV, **s.env}
    gpu_job = job.kind != "report"
    return run.SlurmExecutor(
        account=s.account or None,
        partition=s.partition or None,
        time=s.time if gpu_job else REPORT_TIME,
        nodes=plan.launch.nodes if gpu_job else 1,
        ntasks_per_node=1,  # one torchrun agent per node; it starts procs_per_node workers
        gpus_per_node=s.gpus_per_node if (gpu_job and s.gpus_per_node) else None,
        mem=s.mem,
        exclusive=True if (s.exclusive and gpu_job) else None,
        container_image=s.container_image,
        container_mounts=list(s.container_mounts),
        env_vars=dict(env),  # written verbatim as `export KEY=VALUE` (shell syntax: $VARS expand)
        signal=f"USR1@{s.signal_seconds_before_end}" if gpu_job and s.signal_seconds_before_end else None,
        # --requeue: scontrol may requeue it (preemption.py); --kill-on-invalid-dep: when a parent fails, its
        # dependents are cancelled instead of pending forever (DependencyNeverSatisfied).
        additional_parameters={"requeue": True, "kill_on_invalid_dep": "yes"},
        job_name_prefix=f"{plan.name}-",
        tunnel=make_tunnel(s),
        packager=run.Packager(),
        poll_estimated_start_time=False,
    )


def slurm_script(plan: PlanConfig, job: Job, plan_path: str):
    """The ``run.Script`` a job's srun executes (``python -m ...``; paths shell-quoted, ``$head_node_ip`` not).

    Paths are absolute: the job's working directory is NeMo-Run's (``<job_dir>/code`` or ``/nemo_run/code``)."""
    run = load_nemo_run()
    from nemo_run.core.execution.base import ExecutorMacros

    # NeMo-Run substitutes its macros in the args: "$$${head_node_ip_var}" becomes "$head_node_ip" in the script.
    head = f"$${ExecutorMacros.HEAD_NODE_IP_VAR}"
    run_dir = plan.run_dir if plan.launch.slurm.tunnel == "ssh" else str(Path(plan.run_dir).resolve())
    module, args = job_command(job, shlex.quote(plan_path), shlex.quote(run_dir), plan.launch.nodes,
                               plan.launch.procs_per_node, rdzv_host=head)
    return run.Script(path=module, m=True, entrypoint=job_environment(plan)[0], args=args)


def add_jobs(exp, plan: PlanConfig, jobs: list[Job], plan_path: str) -> None:
    """Add every job to ``exp`` (inside its context) with its dependencies (afterok on SLURM)."""
    for job in jobs:
        exp.add(slurm_script(plan, job, plan_path), executor=slurm_executor(plan, job), name=job.name,
                dependencies=list(job.deps) or None)


def render_sbatch(plan: PlanConfig, jobs: list[Job], plan_path: str, out_dir: Path) -> dict[str, str]:
    """Render every job's sbatch script with NeMo-Run (``Experiment.dryrun``) to ``out_dir/<job>.sbatch``.

    Dependencies appear as ``--dependency=afterok:<parent>`` placeholders (real ids exist only at submission).
    """
    run = load_nemo_run()
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = run.Experiment(plan.name, base_dir=str(out_dir / "nemo_run"), clean_mode=True,
                         enable_goodbye_message=False, skip_status_at_exit=True)
    with exp:
        add_jobs(exp, plan, jobs, plan_path)
        for nr_job, job in zip(exp.jobs, jobs):
            nr_job.executor.dependencies = [f"slurm_tunnel://nemo_run/<{d}>" for d in job.deps]
        with no_stdin():
            exp.dryrun(log=False, delete_exp_dir=False)
        paths = {}
        interp, code, why = job_environment(plan)
        for nr_job, job in zip(exp.jobs, jobs):
            ex = nr_job.executor
            rendered = Path(ex.experiment_dir) / f"{ex.job_name}_sbatch.sh"
            deps = f" --dependency=afterok:{':'.join(job.deps)}" if job.deps else ""
            header = (f"# megatron-s2d dry run of job {job.name!r} (plan {plan.name!r}); NeMo-Run submits it as\n"
                      f"#   sbatch --requeue --parsable{deps} <this script>\n"
                      f"# with the parents' real job ids in place of the <stage> placeholders.\n"
                      f"# interpreter: {interp} ({why}); megatron-s2d code: {code}\n")
            text = rendered.read_text()
            first, _, rest = text.partition("\n")  # keep the shebang first
            path = out_dir / f"{job.name}.sbatch"
            path.write_text(f"{first}\n{header}{rest}")
            paths[job.name] = str(path)
    return paths
