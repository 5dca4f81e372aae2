"""Generation on ranks of their own (``rollout.placement: separate``, rollout.remote) in real stage jobs of the mini
world: a GRPO, a forward-KL warmup (the frozen teacher generates) and an OPD stage, 3 steps each, run through the job entry (``stages.entry.run_stage``: the world split,
the generator server, the weight pushes):

* k = 0 on 2 trainers + 2 generators equals colocated on 2 ranks: every per-step number the loop computes from the
  samples and the training (rewards, losses, KLs, mismatch, grad norm) is identical;
* k = 1 (OPD): the generators run one step ahead; the recorded staleness is 0 at the first step and 1 after, the
  rollout correction is on by default (``rollout_correction.mode: auto`` -> tis) and its inputs (engine vs trainer
  log-probs) show the lag;
* a generation rank that stops mid-step (SIGSTOP: its heartbeat stops too) fails the job within
  ``rollout.sync_timeout_s``, naming the rank and the phase; the checkpoint before it holds the rollouts that were in
  flight, and the resumed job's steps equal the uninterrupted run's.
"""

import json
import time
from pathlib import Path

import pytest

from tests.distributed._launch import DistributedError, run_distributed
from tests.functional.conftest import mini_plan

pytestmark = [pytest.mark.functional]

# numbers that describe time, throughput or the placement itself, not what the step computed
_NOT_COMPARED = ("time", "_s", "per_s", "staleness", "weights_version", "refit", "generator_", "trainer_wait",
                 "idle_frac")


def _prepare(rank, world, plan_dict):
    from megatron_s2d.config.loader import plan_from_dict
    from megatron_s2d.run.preflight import prepare_run

    plan, _ = prepare_run(plan_from_dict(plan_dict), log=lambda m: None)
    return plan


def _run(rank, world, plan, names, stop_rank=None, stop_call=None):
    from megatron_s2d.rewards import shutdown_pool
    from megatron_s2d.runtime.dist import shutdown
    from megatron_s2d.stages.entry import run_stage

    if rank == stop_rank:  # this generation rank stops answering at its stop_call-th generation (mid-step)
        import os
        import signal

        from megatron_s2d.rollout.megatron_sampler import MegatronSampler

        real, calls = MegatronSampler.generate, []

        def generate(self, *a, **k):
            calls.append(1)
            if len(calls) == stop_call:
                os.kill(os.getpid(), signal.SIGSTOP)
            return real(self, *a, **k)

        MegatronSampler.generate = generate
    try:
        return [run_stage(plan, name) for name in names]
    finally:
        shutdown_pool()
        shutdown()


def _metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def _compared(m: dict) -> dict:
    return {k: v for k, v in m.items() if not any(p in k for p in _NOT_COMPARED)}


def _plan(mini_world, run: Path, procs: int, rollout: dict) -> dict:
    stages = [{"name": "trl", "kind": "teacher_rl", "split": "1H", "eval": False},
              {"name": "fkl", "kind": "fkl_warmup", "init": "base", "teacher": "base", "split": "1H", "eval": False},
              {"name": "opd", "kind": "opd", "init": "base", "teacher": "base", "split": "1H", "eval": False}]
    plan = mini_plan(mini_world, run, stages, eval={"k": 1, "max_new_tokens": 4, "include_base": False},
                     launch={"procs_per_node": procs})
    plan["stage_defaults"].update(steps=3, rollout={"engine": "megatron", "max_new_tokens": 8, **rollout})
    return plan


def _prepared(mini_world, run: Path, procs: int, rollout: dict, **stage_defaults):
    plan = _plan(mini_world, run, procs, rollout)
    plan["stage_defaults"].update(stage_defaults)
    return run_distributed(_prepare, world_size=1, timeout=300, init_process_group=False, plan_dict=plan)[0]


def _stage_runs(mini_world, tmp_path, name, procs, rollout, stages=("trl", "fkl", "opd"), one_job=False):
    run = tmp_path / name
    plan = _prepared(mini_world, run, procs, rollout)
    # one job per stage, as the launcher runs them (a split world is made once per job); colocated stages can share
    for names in [list(stages)] if one_job else [[n] for n in stages]:
        codes = run_distributed(_run, world_size=procs, timeout=600, init_process_group=False, plan=plan,
                                names=names)
        assert all(c == [0] * len(names) for c in codes), codes
    return run


def test_separate_k0_equals_colocated_and_k1_runs_one_step_ahead(mini_world, tmp_path):
    colocated = _stage_runs(mini_world, tmp_path, "colocated", 2, {}, one_job=True)
    k0 = _stage_runs(mini_world, tmp_path, "k0", 4, {"placement": "separate", "generation_ranks": 2})
    # k = 1 on the OPD stage (the toy GRPO's groups have zero reward variance: its weights would not move)
    k1 = _stage_runs(mini_world, tmp_path, "k1", 4, {"placement": "separate", "generation_ranks": 2,
                                                      "max_staleness": 1}, stages=("opd",))
    for stage in ("trl", "fkl", "opd"):
        want, got = _metrics(colocated, stage), _metrics(k0, stage)
        assert len(want) == len(got) == 3
        for w, g in zip(want, got):
            assert _compared(g) == _compared(w), (stage, w, g)
            assert g.get("staleness", 0) == 0
        if stage != "opd":
            continue
        lagged = _metrics(k1, stage)
        assert [m["staleness"] for m in lagged] == [0, 1, 1], lagged
        assert [m["staleness_max"] for m in lagged] == [m["staleness_mean"] for m in lagged] == [0, 1, 1]
        # the idle fractions of both sides: the trainers no longer wait once generation runs ahead
        assert all(0 <= m["generator_idle_frac"] <= 1 for m in lagged)
        assert "trainer_idle_frac" not in lagged[0] and all(0 <= m["trainer_idle_frac"] < 0.5 for m in lagged[1:])
        assert [m["weights_version"] for m in lagged] == [0, 0, 1]
        # step 0 is generated by the same weights in both; later steps by one-step-old weights
        # (the loss differs only by the TIS weights, 1 +- 1e-6 where the engine and trainer agree to float rounding)
        assert {k: v for k, v in _compared(lagged[0]).items() if not k.startswith("is_")} == \
            pytest.approx(_compared(want[0]), rel=1e-5, abs=1e-9)
        assert all("is_weight_mean" in m for m in lagged)  # rollout_correction auto: tis, as generation runs ahead
        # trainer at version 2 vs the engine's version-1 log-probs: the lag the rollout correction sees
        assert lagged[2]["logprob_mismatch_max"] > 100 * want[2]["logprob_mismatch_max"], (lagged, want)

    # a generation rank stops mid-step 2 (its 3rd generation): the job fails within the timeout, naming it; the
    # checkpoint after step 0 holds step 1's rollouts (generated ahead, by version 0)
    killed = tmp_path / "killed"
    rollout = {"placement": "separate", "generation_ranks": 2, "max_staleness": 1, "sync_timeout_s": 10}
    plan = _prepared(mini_world, killed, 4, rollout, save_every=1)
    t0 = time.monotonic()
    with pytest.raises(DistributedError) as failed:
        run_distributed(_run, world_size=4, timeout=300, init_process_group=False, plan=plan, names=["opd"],
                        stop_rank=3, stop_call=3)
    assert "global rank 3 (generate rank 1) has not answered" in str(failed.value)
    assert "rollouts of step 2" in str(failed.value) and time.monotonic() - t0 < 120
    ckpts = sorted((killed / "stages" / "opd" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000001"] and (ckpts[0] / "in_flight_rollouts.json").is_file()
    codes = run_distributed(_run, world_size=4, timeout=600, init_process_group=False, plan=plan, names=["opd"])
    assert all(c == [0] for c in codes), codes
    assert [_compared(m) for m in _metrics(killed, "opd")] == [_compared(m) for m in _metrics(k1, "opd")]
    assert [m["staleness"] for m in _metrics(killed, "opd")] == [0, 1, 1]
