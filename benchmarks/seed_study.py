"""The main plan over several seeds: mean and spread of every route and of every paired difference of the report.

    python benchmarks/seed_study.py [--plan run_configs/toy_cpu.yaml] [--seeds 1 2 3] [--out runs/seed_study]
                                    [--eval-set toy-test]

Each seed is a full ``s2d run PLAN seed=S run_dir=OUT/seed_S`` through the installed console script (a finished seed
is reused: its stages are complete). The plan seed drives every sampling and training random stream and the
evaluation seeds; the toy world (models, tokenizer) and the data split stay fixed, so the spread is that of the
pipeline's own randomness on one world. Prints (and writes to OUT/seed_study.md / .json):
- per route: mean over seeds of avg@k, the standard deviation across seeds, min and max;
- per paired difference of the report: mean over seeds, std across seeds, and in how many seeds it exceeded two
  paired standard errors in either direction.
Every figure is computed from the runs' own report.json files.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _s2d() -> str:
    exe = Path(sys.executable).with_name("s2d")
    return str(exe) if exe.is_file() else (shutil.which("s2d") or "s2d")


def run_seed(plan: str, seed: int, run_dir: Path) -> float:
    """Run the plan with this seed (resuming whatever is complete); returns the wall seconds."""
    t0 = time.time()
    cmd = [_s2d(), "run", plan, f"seed={seed}", f"run_dir={run_dir}"]
    print(f"[seed_study] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    (run_dir.parent / f"seed_{seed}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); log: {run_dir.parent / f'seed_{seed}.log'}")
    return time.time() - t0


def _stats(xs: list[float]) -> dict:
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "min": min(xs), "max": max(xs), "n": n}


def summarize(reports: dict[int, dict], eval_set: str) -> dict:
    routes: dict[str, list[float]] = {}
    diffs: dict[str, list[tuple[float, float]]] = {}
    for rep in reports.values():
        for r in rep["rows"]:
            if eval_set in r["evals"]:
                routes.setdefault(r["route"], []).append(r["evals"][eval_set]["avg"])
        for p in rep["paired"]:
            if p["set"] == eval_set:
                diffs.setdefault(f"{p['a']} − {p['b']}", []).append((p["diff"], p["stderr"]))
    return {"routes": {k: _stats(v) for k, v in routes.items()},
            "diffs": {k: {**_stats([d for d, _ in v]),
                          "above_2se": sum(d > 2 * se for d, se in v), "below_2se": sum(d < -2 * se for d, se in v)}
                      for k, v in diffs.items()}}


def markdown(summary: dict, seeds: list[int], walls: dict[int, float], eval_set: str) -> str:
    lines = [f"Seeds {seeds} ({eval_set}, avg@k in points; wall per seed: "
             + ", ".join(f"{s}: {walls[s] / 60:.1f} min" for s in seeds) + ")", "",
             "| route | mean | sd across seeds | min | max |", "|---|---|---|---|---|"]
    for name, s in summary["routes"].items():
        lines.append(f"| {name} | {100 * s['mean']:.1f} | {100 * s['sd']:.1f} | {100 * s['min']:.1f} | "
                     f"{100 * s['max']:.1f} |")
    lines += ["", "| paired difference | mean | sd across seeds | seeds > +2 se | seeds < −2 se |",
              "|---|---|---|---|---|"]
    for name, s in summary["diffs"].items():
        lines.append(f"| {name} | {100 * s['mean']:+.1f} | {100 * s['sd']:.1f} | {s['above_2se']}/{s['n']} | "
                     f"{s['below_2se']}/{s['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="run_configs/toy_cpu.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/seed_study")
    ap.add_argument("--eval-set", default="toy-test")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reports, walls = {}, {}
    for seed in args.seeds:
        run_dir = out / f"seed_{seed}"
        walls[seed] = run_seed(args.plan, seed, run_dir)
        reports[seed] = json.loads((run_dir / "report" / "report.json").read_text())
    summary = summarize(reports, args.eval_set)
    md = markdown(summary, args.seeds, walls, args.eval_set)
    (out / "seed_study.md").write_text(md + "\n")
    (out / "seed_study.json").write_text(json.dumps({"seeds": args.seeds, "wall_s": walls, **summary}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
