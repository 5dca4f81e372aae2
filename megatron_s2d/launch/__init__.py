"""Launching plans: NeMo-Run experiments (local torchrun / SLURM sbatch), dry-run validation, memory estimates.

Importing this package does not import nemo_run, torch, Transformer Engine or vLLM (login nodes stay fast);
NeMo-Run is imported when an experiment is built.
"""

from megatron_s2d.launch.dry_run import JobCheck, check_jobs, dry_run, format_table, resolve_arch
from megatron_s2d.launch.experiment import PlannedRun, build_experiment, launch_plan, run_plan
from megatron_s2d.launch.jobs import Job, plan_jobs
from megatron_s2d.launch.memory import MemoryEstimate, estimate_stage_memory

__all__ = ["Job", "JobCheck", "MemoryEstimate", "PlannedRun", "build_experiment", "check_jobs", "dry_run",
           "estimate_stage_memory", "format_table", "launch_plan", "plan_jobs", "resolve_arch", "run_plan"]
