"""Stand-in for the stage and report entry points in launcher tests (the launcher only needs their contract).

Stage mode (``--plan P --stage S``): prints a few progress lines per rank and writes ``<run_dir>/stages/S/COMPLETE``
(rank 0). Environment switches:
  * ``S2D_FAKE_FAIL=S``: stage S exits 3 before writing COMPLETE;
  * ``S2D_FAKE_WAIT=S``: on its first attempt (SLURM_RESTART_COUNT unset or 0) stage S waits up to 90 s for a
    SIGTERM/SIGUSR1 through :class:`PreemptionHandler` (all ranks agree over gloo), writes ``checkpoint`` and exits with
    ``handler.finish(...)`` (rank 0 requeues under SLURM).
Report mode (``--run-dir R``): writes ``R/report/REPORT_DONE`` listing the complete stages.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import yaml


def _stage(plan_path: str, stage: str) -> int:
    from megatron_s2d.runtime.preemption import PreemptionHandler

    run_dir = Path(yaml.safe_load(Path(plan_path).read_text())["run_dir"])
    out = run_dir / "stages" / stage
    rank = int(os.environ.get("RANK", "0"))
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    handler = PreemptionHandler().install()
    for i in range(3):
        print(f"[fake] stage {stage} rank {rank} step {i}", flush=True)
        time.sleep(0.1)
    if os.environ.get("S2D_FAKE_FAIL") == stage:
        print(f"[fake] stage {stage} failing on purpose", file=sys.stderr, flush=True)
        return 3
    if os.environ.get("S2D_FAKE_WAIT") == stage and int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0:
        print(f"[fake] stage {stage} waiting for a signal", flush=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if handler.should_stop(distributed=distributed):
                out.mkdir(parents=True, exist_ok=True)
                (out / "checkpoint").write_text(f"saved by rank {rank}\n")
                code = handler.finish(rank=rank, distributed=distributed)
                print(f"[fake] stage {stage} saved, exiting {code}", flush=True)
                return code
            time.sleep(0.2)
        return 4
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "COMPLETE").write_text("ok\n")
    handler.uninstall()
    return 0


def _report(run_dir: str) -> int:
    root = Path(run_dir)
    done = sorted(p.parent.name for p in root.glob("stages/*/COMPLETE"))
    (root / "report").mkdir(parents=True, exist_ok=True)
    (root / "report" / "REPORT_DONE").write_text("\n".join(done) + "\n")
    print(f"[fake] report over {done}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan")
    ap.add_argument("--stage")
    ap.add_argument("--run-dir")
    args = ap.parse_args()
    if args.run_dir:
        return _report(args.run_dir)
    return _stage(args.plan, args.stage)


if __name__ == "__main__":
    sys.exit(main())
