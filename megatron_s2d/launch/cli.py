"""The ``s2d`` command: run plans, convert checkpoints, evaluate, report, build the toy world.

    s2d run PLAN.yaml [key=value ...] [--stages a,b] [--executor local|slurm] [--dry-run] [--verbose]
    s2d convert hf-to-megatron | megatron-to-hf | verify ...
    s2d eval --model DIR --data NAME_OR_PATH [--k 16] [--engine megatron|vllm]
    s2d report RUN_DIR
    s2d toy build --out DIR [--seed 0]
Imports stay light at module level so ``s2d --help`` works on a CPU-only login node.
"""

from __future__ import annotations

import argparse
import sys


def quiet_launcher() -> None:
    """The launcher's own library noise off (``s2d run`` without ``--verbose``): warnings that libraries raise while
    it imports megatron-core / NeMo-Run (Apex not installed, FutureWarning, DeprecationWarning) are hidden; warnings
    of megatron-s2d itself stay. The jobs' output is filtered by the local launcher (``launch.experiment``)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"(megatron_s2d|checkpoints_convert)(\.|$)")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _cmd_run(args) -> int:
    from megatron_s2d.config import load_plan
    from megatron_s2d.launch.experiment import run_plan
    from megatron_s2d.stages.layout import RunLayout
    from megatron_s2d.run.preflight import prepare_run, write_resolved_plan

    if not args.verbose:
        quiet_launcher()
    plan = load_plan(args.plan, args.overrides)
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    executor = args.executor or plan.launch.executor
    log = lambda m: print(f"[s2d] {m}", flush=True)  # noqa: E731
    if args.dry_run:
        # No model weights, no conversion, no toy build: layouts are checked from config.json files.
        layout = RunLayout.of(plan.run_dir)
        write_resolved_plan(plan, layout)
        run_plan(plan, str(layout.plan), stages=stages, executor=executor, dry_run=True)
        return 0
    from megatron_s2d.runtime.locks import hold_lock

    # one launcher per run folder (on SLURM: while it prepares and submits; each stage job then locks its stage)
    with hold_lock(RunLayout.of(plan.run_dir).lock, f"run folder {RunLayout.of(plan.run_dir).root}"):
        plan, layout = prepare_run(plan, log=log)
        run_plan(plan, str(layout.plan), stages=stages, executor=executor, verbose=args.verbose)
    if executor == "local":  # on SLURM the report is the last dependent job
        from megatron_s2d.run.report import write_report

        md, plots = write_report(layout.root)
        print("\n" + md + "\n", flush=True)
        log(f"report: {layout.report / 'report.md'}")
        for png in plots:
            log(f"plot: {png}")
    if plan.tracking.tensorboard:
        log(f"curves: tensorboard --logdir {layout.root / 'stages'}")
    if plan.tracking.wandb and plan.tracking.wandb_mode == "offline":
        log(f"W&B (offline): wandb sync {layout.root / 'wandb'}/offline-run-*")
    return 0


def _cmd_report(args) -> int:
    from megatron_s2d.run.report import write_report

    md, plots = write_report(args.run_dir)
    print(md)
    for p in plots:
        print(f"plot: {p}")
    return 0


def _cmd_eval(args) -> int:
    from megatron_s2d.eval.standalone import main as eval_main

    return eval_main(args)


def _cmd_toy(args) -> int:
    from megatron_s2d.toy.build import build_toy_world

    world = build_toy_world(args.out, seed=args.seed, force=args.force)
    print(world)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="s2d", description="megatron-s2d: the sparse-to-dense reward pipeline")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a plan (all stages, or --stages), resuming completed work")
    run.add_argument("plan")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.opd.steps=2 eval.k=4")
    run.add_argument("--stages", default=None, help="comma-separated subset of stage names")
    run.add_argument("--executor", choices=["local", "slurm"], default=None)
    run.add_argument("--dry-run", action="store_true",
                     help="validate layouts + memory and render sbatch scripts without running anything")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show the libraries' output too (NeMo-Run's panels and INFO lines, torchrun, vLLM, "
                          "megatron-core warnings); by default only progress, results and errors are shown")
    run.set_defaults(fn=_cmd_run)

    from checkpoints_convert.cli import add_convert_subcommands

    add_convert_subcommands(sub)  # s2d convert {hf-to-megatron,megatron-to-hf,verify}

    ev = sub.add_parser("eval", help="avg@k of a checkpoint on MATH / AIME / a local file")
    ev.add_argument("--model", required=True, help="megatron-s2d checkpoint or HF folder")
    ev.add_argument("--data", required=True, action="append", help="dataset name or path (repeatable)")
    ev.add_argument("--k", type=int, default=16)
    ev.add_argument("--engine", choices=["megatron", "vllm"], default="megatron")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, default=1024)
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--tp", type=int, default=1)
    ev.add_argument("--out", default=None, help="write the JSON results here")
    ev.set_defaults(fn=_cmd_eval)

    rep = sub.add_parser("report", help="paper-style table + plots of a run")
    rep.add_argument("run_dir")
    rep.set_defaults(fn=_cmd_report)

    toy = sub.add_parser("toy", help="the embedded toy world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tb = toy_sub.add_parser("build", help="build the tiny base teacher/student + tokenizer")
    tb.add_argument("--out", required=True)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--force", action="store_true")
    tb.set_defaults(fn=_cmd_toy)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # dotted overrides may come after options (`s2d run plan.yaml --stages a k=v`): collect them from the leftovers
    args, extra = parser.parse_known_args(argv)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    unknown = [x for x in extra if x not in overrides]
    if unknown or (overrides and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args


def main(argv: list[str] | None = None) -> int:
    from megatron_s2d.errors import S2DError

    args = parse_args(argv)
    try:
        rc = args.fn(args)
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
