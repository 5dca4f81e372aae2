"""One stage as one job: ``torchrun ... -m megatron_s2d.stages.entry --plan RUN/plan.resolved.yaml --stage NAME``.

Also the pseudo-stage ``base_eval`` (evaluates the base teacher and student for the report).
Exit codes: 0 done (or preempted after a clean checkpoint and requeued), 75 preempted without requeue, 2 bad input
(:class:`~megatron_s2d.errors.S2DError`, the message names the field/file and the fix), 1 anything else: our bug
or a crash (:class:`~megatron_s2d.errors.InternalError` states the invariant that broke; a traceback is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _quiet() -> None:
    """Library noise off in the job's output (Apex / Transformer Engine not installed, FutureWarning,
    DeprecationWarning, megatron's INFO logs), unless the launcher runs ``s2d run --verbose`` (``S2D_VERBOSE=1``).
    What still gets through (torchrun, vLLM) the local launcher keeps off the terminal; the log file has it."""
    if os.environ.get("S2D_VERBOSE") != "1":
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
        import logging

        logging.getLogger("megatron").setLevel(logging.ERROR)
    from megatron_s2d.config.validate import PlanWarning

    warnings.filterwarnings("ignore", category=PlanWarning)  # the launcher said it when it loaded the plan
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("S2D_THREADS", os.cpu_count() or 1))))


def run_base_eval(plan) -> None:
    """avg@k of the base teacher and student, each at its own layout (a 70B teacher at TP8 PP2, a student at TP1)."""
    import torch

    from megatron_s2d.config.schema import RolloutConfig
    from megatron_s2d.eval.runner import DataParallel
    from megatron_s2d.policy.load import load_model
    from megatron_s2d.rollout.factory import make_sampler
    from megatron_s2d.runtime.dist import data_parallel_group, init_distributed
    from megatron_s2d.stages.job import plan_evaluator
    from megatron_s2d.stages.layout import BASE_EVAL, RunLayout

    layout = RunLayout.of(plan.run_dir)
    evaluator = plan_evaluator(plan)
    out = {}
    for role in ("teacher", "student"):
        info = init_distributed(plan.models[role].tp, plan.models[role].pp, seed=plan.seed)
        loaded = load_model(layout.base_model(role), plan.models[role], seed=plan.seed)
        assets = loaded.assets
        # the base evaluation belongs to no stage: the schema's KV budget ("auto": sized from free GPU memory)
        engine = make_sampler(loaded.model, stop_ids=assets.stop_ids, pad_id=assets.pad_id,
                              max_batch_tokens=RolloutConfig().max_batch_tokens)
        log = (lambda m: print(f"[base_eval] {m}", flush=True)) if info.is_main else None
        results = evaluator.evaluate(engine, assets.tokenizer, assets.stop_ids, label=f"{role}_base", log=log,
                                     dp=DataParallel(info.dp_rank, info.dp, data_parallel_group()),
                                     show_progress=info.is_main)
        out[f"{role}_base"] = {"label": f"{role}_base", "results": results}
        del loaded, engine
    if torch.distributed.get_rank() == 0:
        d = layout.stage(BASE_EVAL)
        d.mkdir(parents=True, exist_ok=True)
        (d / "eval.json").write_text(json.dumps(out, indent=1))
        layout.complete_marker(BASE_EVAL).write_text("base models evaluated\n")


def warm_reward_pool(plan, name: str, handler) -> bool:
    """Start the math-verify workers before the first step, for a stage whose loss grades samples against labels
    (``config.kinds.consumes_labels``: GRPO, OPD with a task reward); a stage that reads no labels starts none (its
    evaluation, if any, starts them when it grades), nor does a plan graded by ``hendrycks_boxed`` (graded in
    process). Returns whether it started them."""
    from megatron_s2d.rewards.pool import get_pool

    stage = next((s for s in plan.stages if s.name == name), None)
    if stage is None or not stage.consumes_labels() or plan.grader != "math_verify":
        return False
    with handler.shield_children():  # reward workers must not die of the SIGUSR1 meant for us
        get_pool().warm_up(2)
    return True


def loop_of(stage):
    """The stage loop of a stage's kind, registered by its config class: ``loop(job) -> preempted``."""
    from megatron_s2d.config.schema import GRPOStageConfig, OPDStageConfig, TeacherSFTStageConfig, WarmupStageConfig
    from megatron_s2d.stages import fkl_warmup, grpo, opd, teacher_sft

    loops = {GRPOStageConfig: grpo.run, WarmupStageConfig: fkl_warmup.run, OPDStageConfig: opd.run,
             TeacherSFTStageConfig: teacher_sft.run}
    return loops[type(stage)]


def run_stage(plan, name: str) -> int:
    """Run (or resume) one stage; returns the process exit code."""
    from megatron_s2d.runtime.preemption import PreemptionHandler
    from megatron_s2d.stages.job import StageJob
    from megatron_s2d.stages.layout import RunLayout

    layout = RunLayout.of(plan.run_dir)
    if layout.is_complete(name):  # e.g. re-submitted on SLURM: nothing to do, if it was made with these settings
        from megatron_s2d.stages.provenance import check_drift, recorded_config

        by_name = {s.name: s for s in plan.stages}
        recorded = recorded_config(layout, name)
        if name in by_name and recorded is not None:
            check_drift(plan, by_name[name], recorded)
        print(f"[{name}] already complete; skipping", flush=True)
        return 0
    from megatron_s2d.config.validate import separate
    from megatron_s2d.errors import InternalError

    stage = next((s for s in plan.stages if s.name == name), None)
    if stage is not None and stage.generates() and stage.rollout.placement == "auto":
        raise InternalError(f"stages.{name}.rollout.placement = 'auto' reached the stage job: the launcher resolves "
                            "it (launch.checks.resolve_placements) before writing plan.resolved.yaml")
    bridge = None
    if stage is not None and separate(stage):
        from megatron_s2d.runtime.bridge import GENERATE, split_world

        # generation ranks of their own (rollout.remote): the last generation_ranks ranks serve the trainers
        bridge = split_world(stage.rollout.generation_ranks, stage.rollout.sync_timeout_s)
        if bridge.role == GENERATE:
            from megatron_s2d.rollout.remote import serve

            return serve(bridge, seed=plan.seed)
    handler = PreemptionHandler().install()
    warm_reward_pool(plan, name, handler)
    job = StageJob(plan, name, preemption=handler, bridge=bridge)
    try:
        with job.exclusive():
            preempted = loop_of(job.stage)(job)
    finally:
        job.close_engines()
    if preempted:
        return handler.finish(rank=job.dist.rank, distributed=True)
    handler.uninstall()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron_s2d.stages.entry")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args(argv)
    _quiet()
    from megatron_s2d.config import load_plan
    from megatron_s2d.errors import S2DError
    from megatron_s2d.runtime.dist import shutdown
    from megatron_s2d.stages.layout import BASE_EVAL

    try:
        plan = load_plan(args.plan)  # once per job
        if args.stage == BASE_EVAL:
            run_base_eval(plan)
        else:
            return run_stage(plan, args.stage)
    except S2DError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from megatron_s2d.rewards import shutdown_pool

        shutdown_pool()
        shutdown()
    return 0


def exit_now(code: int) -> None:
    """End the job process without the interpreter's module teardown: about 1.4 s on 2 CPU cores (torch, megatron,
    transformers and thousands of modules finalised one by one) after everything is written, paid by every stage job
    process. The exit handlers still run (``atexit``: what libraries registered, e.g. W&B's), logging is flushed and
    closed, stdout / stderr flushed; the job's own files are written and closed before ``main`` returns (checkpoints,
    metrics, COMPLETE). Only on a normal return: an exception still ends the interpreter the usual way, with its
    traceback."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
