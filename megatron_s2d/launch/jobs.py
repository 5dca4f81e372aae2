"""The jobs of one launch: which stages run, what each waits for, and the command line each job executes.

A plan launches as

    [base_eval]  one job per selected stage (topological order)  [report]

* ``base_eval`` (when ``eval.include_base`` and the whole plan is launched) evaluates the base teacher and student;
  it has no parents.
* A stage job waits for its parents (``init`` and ``teacher`` stages) that are launched with it. A parent that is
  not launched must already be complete (``<run_dir>/stages/<name>/COMPLETE``), else the launch is refused.
* Complete stages are skipped (``include_complete`` keeps them, for dry runs).
* ``report`` (``python -m megatron_s2d.run.report_entry --run-dir RUN_DIR``) waits for every other job.

Stage jobs run ``python -m megatron_s2d.launch.agent`` (torchrun + SIGUSR1 forwarding, see ``agent.py``) with
``-m megatron_s2d.stages.entry --plan <plan.resolved.yaml> --stage <name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_s2d.config.schema import PlanConfig
from megatron_s2d.config.validate import parents, topo_order
from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.stages.layout import BASE_EVAL, RunLayout

REPORT = "report"
AGENT_MODULE = "megatron_s2d.launch.agent"
STAGE_ENTRY = "megatron_s2d.stages.entry"
REPORT_ENTRY = "megatron_s2d.run.report_entry"
RDZV_PORT = 29500


@dataclass(frozen=True)
class Job:
    name: str  # stage name, "base_eval" or "report"
    kind: Literal["stage", "base_eval", "report"]
    deps: tuple[str, ...] = ()  # jobs of this launch it waits for (SLURM: afterok)
    complete: bool = False  # already complete on disk (only listed when include_complete)


def plan_jobs(plan: PlanConfig, stages: list[str] | None = None, include_complete: bool = False,
              report: bool = True, check_parents: bool = True) -> list[Job]:
    """The jobs to launch for ``stages`` (None: the whole plan), in launch order."""
    order = [s.name for s in topo_order(plan)]
    layout = RunLayout.of(plan.run_dir)
    if stages is not None:
        unknown = sorted(set(stages) - set(order) - {BASE_EVAL})
        if unknown:
            raise S2DError(f"--stages {', '.join(unknown)}: no such stage; stages: {order} (or {BASE_EVAL!r})")
    if stages is None:
        wanted = set(order) | ({BASE_EVAL} if plan.eval.include_base else set())
    else:
        wanted = set(stages)
    by_name = {s.name: s for s in plan.stages}
    jobs: list[Job] = []
    launched: set[str] = set()
    if BASE_EVAL in wanted:
        done = layout.is_complete(BASE_EVAL)
        if include_complete or not done:
            jobs.append(Job(BASE_EVAL, "base_eval", (), done))
            launched.add(BASE_EVAL)
    for name in order:
        if name not in wanted:
            continue
        done = layout.is_complete(name)
        if done and not include_complete:
            continue
        deps = []
        for p in parents(by_name[name]):
            if p in launched:
                deps.append(p)
            elif check_parents and not layout.is_complete(p):
                raise S2DError(f"stage {name!r} reads stage {p!r}, which is neither complete "
                               f"({layout.complete_marker(p)} missing) nor launched with it: add it to the stages "
                               f"to run, or run it first")
        jobs.append(Job(name, "stage", tuple(deps), done))
        launched.add(name)
    if report:
        jobs.append(Job(REPORT, "report", tuple(j.name for j in jobs)))
    return jobs


def torchrun_args(nodes: int, procs_per_node: int, rdzv_host: str | None) -> list[str]:
    """torchrun arguments: standalone on one node; c10d rendezvous on ``rdzv_host`` (the first node) otherwise."""
    args = ["--nnodes", str(nodes), "--nproc-per-node", str(procs_per_node)]
    if nodes == 1:
        return ["--standalone"] + args
    if rdzv_host is None:
        raise S2DError(f"launch.nodes = {nodes}: a multi-node job needs a rendezvous host (use the SLURM executor)")
    return args + ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rdzv_host}:{RDZV_PORT}", "--max-restarts", "0"]


def job_command(job: Job, plan_path: str, run_dir: str, nodes: int, procs_per_node: int,
                rdzv_host: str | None = None, agent: bool = True) -> tuple[str, list[str]]:
    """(module, args) that ``python -m module args...`` runs for ``job``.

    agent=False (the local executor's one-process jobs): the stage entry itself, without torchrun, which a single
    process does not need (it saves a Python start and a torch import per job; the entry sets up a one-process
    world on a free port).
    """
    if job.kind == "report":
        return REPORT_ENTRY, ["--run-dir", run_dir]
    entry = [STAGE_ENTRY, "--plan", plan_path, "--stage", job.name]
    if not agent:
        if nodes * procs_per_node != 1:
            raise InternalError(f"job {job.name}: a job of {nodes} x {procs_per_node} processes needs torchrun")
        return entry[0], entry[1:]
    return AGENT_MODULE, torchrun_args(nodes, procs_per_node, rdzv_host) + ["-m"] + entry
