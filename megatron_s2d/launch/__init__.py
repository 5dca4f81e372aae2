"""Launching plans: pure checks (layouts, memory), planning a launch, rendering (dry run) or submitting it with
NeMo-Run (local torchrun / SLURM sbatch), and the ``s2d`` CLI.

Importing this package does not import nemo_run, torch, Transformer Engine or vLLM (login nodes stay fast);
NeMo-Run is imported when an experiment is built.
"""

from megatron_s2d.launch.checks import JobCheck, check_jobs, format_table, resolve_arch
from megatron_s2d.launch.experiment import (JobSelection, PlannedRun, dry_run, launch_plan, plan_launch, render,
                                            run_plan, submit)
from megatron_s2d.launch.jobs import Job, plan_jobs
from megatron_s2d.models.memory import StageMemory, estimate_stage_memory, vllm_memory_fraction

__all__ = ["Job", "JobCheck", "JobSelection", "PlannedRun", "StageMemory", "check_jobs", "dry_run",
           "estimate_stage_memory", "format_table", "launch_plan", "plan_jobs", "plan_launch", "render",
           "resolve_arch", "run_plan", "submit", "vllm_memory_fraction"]
