"""The ``s2d`` command: run plans, convert checkpoints, evaluate, report, build the toy world.

    s2d run PLAN.yaml [key=value ...] [--stages a,b] [--executor local|slurm] [--dry-run] [--print-plan] [--verbose]
    s2d convert hf-to-megatron | megatron-to-hf | verify ...
    s2d eval --model DIR --data NAME_OR_PATH [--k 16] [--engine megatron|vllm] [--out FILE]
    s2d report RUN_DIR [--out DIR]
    s2d status RUN_DIR
    s2d toy build --out DIR [--seed 0]
    s2d --version
Imports stay light at module level so ``s2d --help`` works on a CPU-only login node. Exit codes: 0 done, 2 bad input
(an S2DError; or an OS error on a path the command was given: a read-only folder, a file where a folder should be,
a full disk), 1 our bug (a traceback).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path


def quiet_launcher() -> None:
    """The launcher's own library noise off (``s2d run`` and ``s2d eval`` without ``--verbose``): warnings that
    libraries raise while it imports megatron-core / NeMo-Run (Apex not installed) are hidden, and so are their
    FutureWarning / DeprecationWarning even where our code is the caller (a torch deprecation met in
    ``runtime.cpu_shim``); other warnings of megatron-s2d itself stay. The jobs' output is filtered by the local
    launcher (``launch.experiment``)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"(megatron_s2d|checkpoints_convert)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _cmd_run(args) -> int:
    if args.print_plan:
        return _print_plan(args)
    from megatron_s2d.config import load_plan
    from megatron_s2d.launch.experiment import JobSelection, plan_launch, run_plan
    from megatron_s2d.run.preflight import prepare_run
    from megatron_s2d.stages.layout import RunLayout

    if not args.verbose:
        quiet_launcher()
    from megatron_s2d.launch.checks import resolve_placements

    plan = load_plan(args.plan, args.overrides)
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    restart = [s for s in (args.restart or "").split(",") if s]
    executor = args.executor or plan.launch.executor
    log = lambda m: print(f"[s2d] {m}", flush=True)  # noqa: E731
    plan = resolve_placements(plan, log)  # rollout.placement: auto, chosen once, before any job or dry run
    layout = RunLayout.of(plan.run_dir)
    if args.dry_run:
        _dry_run(plan, layout, stages, executor, restart, log)
        return 0
    from megatron_s2d.runtime.locks import hold_lock

    def launch_checks(resolved):  # layouts and memory of every selected job, before the run folder changes
        plan_launch(resolved, str(layout.plan), stages, executor, JobSelection.dry_run())

    # one launcher per run folder (on SLURM: while it prepares and submits; each stage job then locks its stage)
    with hold_lock(layout.lock, f"run folder {layout.root}"):
        plan, layout = prepare_run(plan, log=log, check=launch_checks, restart=tuple(restart))
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


def _dry_run(plan, layout, stages, executor, restart: list[str], log) -> None:
    """``--dry-run``: every check a run makes (config drift included, read-only), the scripts and the table; nothing
    of the run folder's state is written: the resolved plan goes to ``RUN/dry_run/plan.resolved.yaml`` next to the
    scripts, which name ``RUN/plan.resolved.yaml`` as a real run's jobs would read it. No model weights, no
    conversion, no toy build: layouts are checked from config.json files."""
    from megatron_s2d.launch.experiment import run_plan
    from megatron_s2d.run.preflight import write_resolved_plan
    from megatron_s2d.stages.provenance import check_plan_drift, descendants

    redo = {n for name in restart for n in [name, *descendants(plan, name)]}
    for note in check_plan_drift(plan, layout, skip=redo):
        log(note)
    for name in restart:
        log(f"--restart {name}: a run would set aside {sorted(n for n in redo if layout.stage(n).exists()) or 'nothing'}")
    run_plan(plan, str(layout.plan), stages=stages, executor=executor, dry_run=True)
    write_resolved_plan(plan, layout, layout.root / "dry_run" / "plan.resolved.yaml")


def _print_plan(args) -> int:
    """``s2d run PLAN --print-plan``: the plan as a run reads it (``base`` recipes merged, ``stage_defaults`` and
    overrides applied, every default filled in, validated, run_dir absolute) as YAML on stdout; nothing is written.
    A toy plan's model folders are filled in when the run builds or finds its toy world."""
    import dataclasses

    import yaml

    from megatron_s2d.config import load_plan, to_dict
    from megatron_s2d.stages.layout import RunLayout

    from megatron_s2d.launch.checks import resolve_placements

    plan = load_plan(args.plan, args.overrides)
    plan = resolve_placements(plan, log=lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    plan = dataclasses.replace(plan, run_dir=str(RunLayout.of(plan.run_dir).root))
    print(yaml.safe_dump(to_dict(plan), sort_keys=False), end="", flush=True)
    return 0


def _cmd_report(args) -> int:
    from megatron_s2d.run.report import write_report

    md, plots = write_report(args.run_dir, args.out)
    print(md)
    for p in plots:
        print(f"plot: {p}")
    return 0


def _cmd_status(args) -> int:
    from megatron_s2d.run.status import format_status, run_status

    plan, statuses = run_status(args.run_dir)
    print(format_status(args.run_dir, plan, statuses))
    return 0


def _cmd_eval(args) -> int:
    from megatron_s2d.eval.standalone import main as eval_main

    if not args.verbose:
        quiet_launcher()
    return eval_main(args)


def _cmd_toy(args) -> int:
    from megatron_s2d.toy.build import build_toy_world

    world = build_toy_world(args.out, seed=args.seed, force=args.force)
    print(world)
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: each option's default where it has one (not for flags, nor for options whose absence means
    something their help states), and the example in the epilog as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def example(*commands: str) -> str:
    """An epilog: the command lines a user would type."""
    return "example:\n" + "\n".join(f"  {c}" for c in commands)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-s2d")
    except PackageNotFoundError:
        return "(not installed as a package: pip install -e .)"


def _parser(sub, name: str, help: str, epilog: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="s2d", description="megatron-s2d: the sparse-to-dense reward pipeline",
                                 formatter_class=HelpFormatter,
                                 epilog=example("s2d run run_configs/toy_cpu.yaml", "s2d status runs/toy_cpu",
                                                "s2d <command> --help"))
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    run = _parser(sub, "run", "run a plan (all stages, or --stages), resuming completed work",
                  example("s2d run run_configs/toy_cpu.yaml stages.opd.steps=2 --stages opd,student_rl"))
    run.add_argument("plan", help="the plan's YAML file (run_configs/*.yaml, or your own)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.opd.steps=2 eval.k=4")
    run.add_argument("--stages", default=None, help="comma-separated subset of stage names")
    run.add_argument("--executor", choices=["local", "slurm"], default=None,
                     help="where the jobs run (default: the plan's launch.executor)")
    run.add_argument("--restart", default=None, metavar="STAGE[,STAGE]",
                     help="redo these stages: their folders and those of the stages that depend on them are set aside "
                          "under RUN/set_aside/<time>/ (never deleted), then the plan runs")
    run.add_argument("--dry-run", action="store_true",
                     help="validate layouts + memory and render sbatch scripts without running anything")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show the libraries' output too (NeMo-Run's panels and INFO lines, torchrun, vLLM, "
                          "megatron-core warnings); by default only progress, results and errors are shown")
    run.add_argument("--print-plan", action="store_true",
                     help="print the resolved plan (recipes merged, overrides and defaults applied) as YAML and "
                          "exit; nothing is written")
    run.set_defaults(fn=_cmd_run)

    from checkpoints_convert.cli import add_convert_subcommands

    add_convert_subcommands(sub, formatter_class=HelpFormatter)  # s2d convert {hf-to-megatron,megatron-to-hf,verify}

    ev = _parser(sub, "eval", "avg@k of a checkpoint on MATH / AIME / a local file",
                 example("s2d eval --model release/ --data math500 --data aime2024 --k 16 --out eval.json"))
    ev.add_argument("--model", required=True, help="megatron-s2d checkpoint or HF folder")
    ev.add_argument("--data", required=True, action="append",
                    help="dataset name (math500, aime2024, aime2025, math, dapo-math-17k, toy-test) or a local "
                         ".jsonl/.json/.parquet file or folder (repeatable)")
    ev.add_argument("--schema", default=None,
                    help="the schema of local --data files: dapo, math, math500, aime or s2d (default: detected "
                         "from the columns)")
    ev.add_argument("--strict", action="store_true",
                    help="refuse a malformed row (missing or empty problem / answer, wrong type, invalid JSON), "
                         "naming its file and row; by default such rows are skipped and counted")
    ev.add_argument("--k", type=int, default=16, help="samples per problem (avg@k)")
    ev.add_argument("--engine", choices=["megatron", "vllm"], default="megatron", help="the generation engine")
    ev.add_argument("--grader", choices=["math_verify", "hendrycks_boxed", "both"], default="math_verify",
                    help="what grades the answers: math-verify, lm-eval's Hendrycks last-box string equivalence (the "
                         "authors' public code), or both (avg@k by math-verify, plus each grader's and their agreement)")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="response budget in tokens (default: what the model's context leaves after the longest "
                         "prompt; a larger value is refused)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each set")
    ev.add_argument("--seed", type=int, default=1234, help="sampling seed (same seed: same samples)")
    ev.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with this many "
                                                      "processes per replica)")
    ev.add_argument("--out", default=None,
                    help="write the JSON results to this file (its folder must exist; checked before evaluating); "
                         "default: print them")
    ev.add_argument("-v", "--verbose", action="store_true",
                    help="show the libraries' warnings too (Apex / Transformer Engine, deprecations)")
    ev.set_defaults(fn=_cmd_eval)

    rep = _parser(sub, "report", "paper-style table + plots of a run", example("s2d report runs/x --out /tmp/x"))
    rep.add_argument("run_dir", help="the run folder (the plan's run_dir)")
    rep.add_argument("--out", default=None, metavar="DIR",
                     help="where report.md, report.json and the plots go (default: RUN_DIR/report); the run "
                          "folder itself is only read")
    rep.set_defaults(fn=_cmd_report)

    st = _parser(sub, "status", "where each job of a run stands: complete, running or failed at step k of N",
                 example("s2d status runs/x"))
    st.add_argument("run_dir", help="the run folder (the plan's run_dir); it is only read: no lock is taken")
    st.set_defaults(fn=_cmd_status)

    toy = _parser(sub, "toy", "the embedded toy world", example("s2d toy build --out /tmp/toy --seed 1"))
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tb = _parser(toy_sub, "build", "build the tiny base teacher/student + tokenizer",
                 example("s2d toy build --out /tmp/toy --seed 1"))
    tb.add_argument("--out", required=True, help="the folder to build the world in")
    tb.add_argument("--seed", type=int, default=0, help="the world's seed (0: the shipped world)")
    tb.add_argument("--force", action="store_true", help="rebuild even when --out holds a world already")
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


# OS errors that are the state of the user's filesystem, not our bug: on a path the command was given they are
# exit-2 messages (a missing file is not among them: where we expected one, that may be ours)
_FILESYSTEM = {
    errno.EACCES: "not writable by you: fix its permissions, or use another path",
    errno.EPERM: "not permitted: fix its permissions, or use another path",
    errno.EROFS: "a read-only filesystem: use a path on a writable one",
    errno.ENOTDIR: "a part of this path is a file where a folder should be: move it away, or use another path",
    errno.EEXIST: "a file is there where a folder should be: move it away, or use another path",
    errno.EISDIR: "a folder is there where a file should be: move it away, or use another path",
    errno.ENOSPC: "the disk is full: free some space (the run resumes from its checkpoints), or use another disk",
    errno.EDQUOT: "the disk quota is exhausted: free some space, or use another disk",
}


def _given_paths(args) -> list[Path]:
    """The files and folders this command was pointed at (``s2d run``: the plan file and its run folder)."""
    from megatron_s2d.errors import S2DError

    given = [getattr(args, a, None) for a in ("plan", "run_dir", "out", "model", "hf", "megatron")]
    given += list(getattr(args, "data", None) or [])
    if args.command == "run":
        from megatron_s2d.config.loader import plan_dict
        from megatron_s2d.config.schema import PlanConfig

        try:
            given.append(plan_dict(args.plan, args.overrides).get("run_dir") or PlanConfig.run_dir)
        except (S2DError, OSError):
            pass  # the plan file itself is unreadable: it is among the paths already
    return [Path(p).resolve() for p in given if p]


def filesystem_error(args, e: OSError) -> str | None:
    """The message for an OS error on a path the command was given, or None (not such an error: a bug of ours or
    of a library, which keeps its traceback)."""
    if e.errno not in _FILESYSTEM:
        return None
    roots = _given_paths(args)
    for name in (e.filename, e.filename2):
        if name is None or isinstance(name, int):
            continue
        path = Path(name).resolve()
        if any(path == r or r in path.parents for r in roots):
            return f"{name}: {e.strerror} ({_FILESYSTEM[e.errno]})"
    return None


def main(argv: list[str] | None = None) -> int:
    from megatron_s2d.errors import S2DError

    args = parse_args(argv)
    try:
        rc = args.fn(args)
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: bad input; a stopped launcher: 128 + the signal (LaunchStopped)
    except OSError as e:
        message = filesystem_error(args, e)
        if message is None:
            raise
        print(f"s2d: error: {message}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
