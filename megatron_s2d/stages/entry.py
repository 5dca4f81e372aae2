"""One stage as one job: ``torchrun ... -m megatron_s2d.stages.entry --plan RUN/plan.resolved.yaml --stage NAME``.

Also the pseudo-stage ``base_eval`` (evaluates the base teacher and student for the report).
Exit codes: 0 done (or preempted after a clean checkpoint: SLURM requeues), 2 bad input (S2DError), 1 crash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("S2D_THREADS", os.cpu_count() or 1))))


def run_base_eval(plan_path: str) -> None:
    from megatron_s2d.config import load_plan
    from megatron_s2d.eval.runner import evaluate_policy
    from megatron_s2d.pipeline.layout import BASE_EVAL, RunLayout
    from megatron_s2d.runtime.dist import init_distributed

    plan = load_plan(plan_path)
    layout = RunLayout.of(plan.run_dir)
    out = {}
    for role in ("teacher", "student"):
        # each base model is evaluated at its own layout (a 70B teacher at TP8 PP2, the student at TP1)
        init_distributed(plan.models[role].tp, plan.models[role].pp, seed=plan.seed)
        ctx = _BaseCtx(plan, role, layout)
        out[f"{role}_base"] = evaluate_policy(ctx, ctx.model.module, ctx.arch, f"{role}_base")
        del ctx
    d = layout.stage(BASE_EVAL)
    d.mkdir(parents=True, exist_ok=True)
    import torch

    if torch.distributed.get_rank() == 0:
        (d / "eval.json").write_text(json.dumps(out, indent=1))
        layout.complete_marker(BASE_EVAL).write_text("base models evaluated\n")


class _BaseCtx:
    """The few StageContext attributes ``evaluate_policy`` needs, for a base model."""

    def __init__(self, plan, role, layout):
        import torch
        from transformers import AutoTokenizer

        from megatron_s2d.policy.megatron_policy import MegatronPolicy
        from megatron_s2d.runtime.dist import _info
        from megatron_s2d.runtime.model_ckpt import load_model_checkpoint, read_model_meta
        from megatron_s2d.stages.context import stop_token_ids

        path = layout.base_model(role)
        self.plan, self.arch = plan, read_model_meta(path)[0]
        self.dist = _info(torch.distributed.get_backend())
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        self.stop_ids = stop_token_ids(path, self.tokenizer)
        self.model = MegatronPolicy(self.arch, plan.models[role], optim=None, seed=plan.seed, initialize=False)
        load_model_checkpoint(self.model.module, path)

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[base_eval] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron_s2d.stages.entry")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args(argv)
    _quiet()
    from megatron_s2d.errors import S2DError
    from megatron_s2d.pipeline.layout import BASE_EVAL
    from megatron_s2d.runtime.dist import shutdown

    try:
        if args.stage == BASE_EVAL:
            run_base_eval(args.plan)
        else:
            return run_stage(args.plan, args.stage)
    except S2DError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from megatron_s2d.rewards import shutdown_pool

        shutdown_pool()
        shutdown()
    return 0


def run_stage(plan_path: str, name: str) -> int:
    """Run (or resume) one stage; returns the process exit code."""
    from megatron_s2d.rewards.pool import get_pool
    from megatron_s2d.runtime.preemption import PreemptionHandler
    from megatron_s2d.stages import fkl_warmup, grpo, opd
    from megatron_s2d.stages.context import StageContext

    loops = {"teacher_rl": grpo.run, "student_rl": grpo.run, "fkl_warmup": fkl_warmup.run, "opd": opd.run}
    from megatron_s2d.config import load_plan
    from megatron_s2d.pipeline.layout import RunLayout

    if RunLayout.of(load_plan(plan_path).run_dir).is_complete(name):  # e.g. re-submitted on SLURM: nothing to do
        print(f"[{name}] already complete; skipping", flush=True)
        return 0
    handler = PreemptionHandler().install()
    with handler.shield_children():  # reward workers must not die of the SIGUSR1 meant for us
        get_pool().warm_up(2)
    ctx = StageContext.from_args(plan_path, name)
    ctx.shield_children = handler.shield_children
    if loops[ctx.stage.kind](ctx, handler):
        return handler.finish(rank=ctx.dist.rank, distributed=True)
    handler.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
