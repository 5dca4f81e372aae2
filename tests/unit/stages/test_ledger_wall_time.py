"""The ledger's wall time is the job's elapsed time, counted once: each ``end_step`` adds the time since the job
started or since the previous step ended (loading and anything between steps included), ``finish`` the rest. It
used to add each step's own time and then, in ``finish``, the whole time since the job started again."""

import time
from types import SimpleNamespace

from megatron_s2d.stages.counters import StageState, StepCounters
from megatron_s2d.stages.job import StageJob


def _job(started_ago: float) -> StageJob:
    job = object.__new__(StageJob)  # the bookkeeping only: no world, no models
    job.started = time.perf_counter() - started_ago
    job.stage = SimpleNamespace(steps=3, save_every=0, name="s")
    job.preemption = None
    job.store = SimpleNamespace(metrics=SimpleNamespace(append=lambda step, m: dict(m, step=step + 1)))
    job.dist = SimpleNamespace(is_main=False)
    return job


def test_each_second_of_the_job_is_counted_once():
    job, state = _job(started_ago=5.0), StageState()
    job.end_step(0, None, state, StepCounters(), {}, t0=time.perf_counter() - 2.0)  # loading 3 s + a 2 s step
    assert 5.0 <= state.ledger.wall_time_s < 5.5
    job.end_step(1, None, state, StepCounters(), {}, t0=time.perf_counter() - 1.0)  # the step began 1 s ago, but
    assert 5.0 <= state.ledger.wall_time_s < 5.5  # no time has passed since the previous end_step
