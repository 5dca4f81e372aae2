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
bare-metal cluster with a shared filesystem), or ``launch.slurm.python`` when the cluster profile sets one; a bare
``python`` would be whatever the compute node's PATH finds, without megatron-s2d. With a container image it is the
container's ``python`` unless the profile sets one. The code is not shipped by NeMo-Run (``run.Packager()``): the
interpreter must import megatron-s2d (an install or editable install on the shared filesystem, or ``PYTHONPATH`` in
``launch.slurm.env``); the dry run prints which interpreter and which code folder the jobs will use.
``run_dir`` must be on a filesystem every node sees, at the same path.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
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


def job_environment(plan: PlanConfig) -> tuple[str, str, str]:
    """(interpreter, code folder, why that interpreter) of the plan's SLURM jobs (see the module docstring)."""
    s = plan.launch.slurm
    code = str(Path(__file__).resolve().parents[2])  # where megatron_s2d is imported from here
    if s.python:
        interp, why = s.python, "launch.slurm.python"
        if not os.path.isabs(interp) and interp != "python":
            raise S2DError(f"launch.slurm.python = {interp!r} must be an absolute path (or 'python' for the one on "
                           "the compute node's PATH)")
    elif s.container_image:
        interp, why = "python", f"the container's ({s.container_image})"
        code = "the container's (or PYTHONPATH in launch.slurm.env)"
    elif s.tunnel == "ssh":
        raise S2DError("launch.slurm.python is required with an ssh tunnel and no container image: the interpreter "
                       "that runs s2d here is not on the cluster; set it to the cluster's venv python (absolute path)")
    else:
        interp, why = sys.executable, "the interpreter running s2d (its virtual environment)"
    return interp, code, why


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
        for nr_job, job in zip(exp.jobs, jobs):
            ex = nr_job.executor
            rendered = Path(ex.experiment_dir) / f"{ex.job_name}_sbatch.sh"
            deps = f" --dependency=afterok:{':'.join(job.deps)}" if job.deps else ""
            interp, code, why = job_environment(plan)
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
