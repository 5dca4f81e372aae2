"""The placement settings (``rollout.placement / generation_ranks / max_staleness``) are checked when the plan is
loaded, naming the stage and the field with the fix; the fingerprint treats where generation runs as neutral and
the rollout correction by the mode a stage runs."""

import copy

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.config.fingerprint import is_neutral, stage_fingerprint
from megatron_s2d.errors import S2DError
from tests.unit.config.test_plan_config import BASE, _write


def _plan(tmp_path, launch=None, **rollout):
    d = copy.deepcopy(BASE)
    d["launch"] = dict(d.get("launch", {}), **(launch or {"procs_per_node": 4}))
    d.setdefault("stage_defaults", {}).setdefault("rollout", {}).update({"engine": "megatron", **rollout})
    return load_plan(_write(tmp_path, d))


def test_separate_needs_generation_ranks_that_leave_trainers(tmp_path):
    with pytest.raises(S2DError, match=r"rollout.generation_ranks = 0: with placement 'separate' between 1 and 3"):
        _plan(tmp_path, placement="separate")
    with pytest.raises(S2DError, match=r"generation_ranks = 4: with placement 'separate' between 1 and 3"):
        _plan(tmp_path, placement="separate", generation_ranks=4)
    plan = _plan(tmp_path, placement="separate", generation_ranks=2)
    assert all(s.rollout.generation_ranks == 2 for s in plan.stages)


def test_staleness_needs_ranks_of_its_own(tmp_path):
    with pytest.raises(S2DError, match=r"max_staleness = 1: running generation ahead of training needs ranks of its "
                                       r"own; set rollout.placement: separate"):
        _plan(tmp_path, max_staleness=1)


def test_vllm_generation_ranks_hold_whole_vllm_replicas(tmp_path):
    """vLLM on generation ranks: replicas of ``vllm.tp`` ranks (every layer on each), not the model's tp x pp."""
    plan = _plan(tmp_path, placement="separate", generation_ranks=2, engine="vllm", vllm={"tp": 2})
    assert all(s.rollout.generation_ranks == 2 for s in plan.stages)
    with pytest.raises(S2DError, match=r"generation_ranks = 1: the 1 generation ranks must hold whole replicas of "
                                       r"the \w+'s vLLM engine \(rollout.vllm.tp = 2\)"):
        _plan(tmp_path, placement="separate", generation_ranks=1, engine="vllm", vllm={"tp": 2})


def test_auto_placement_loads_and_leaves_generation_ranks_to_the_launcher(tmp_path):
    plan = _plan(tmp_path, placement="auto")  # resolved by the launcher (tests/unit/launch/test_pricing.py)
    assert all(s.rollout.placement == "auto" for s in plan.stages)
    with pytest.raises(S2DError, match=r"generation_ranks = 2: placement 'auto' chooses it .* remove it, or set "
                                       r"placement: separate"):
        _plan(tmp_path, placement="auto", generation_ranks=2)


def test_where_generation_runs_is_neutral_and_correction_is_recorded_as_run(tmp_path):
    for f in ("rollout.placement", "rollout.generation_ranks", "rollout.sync_timeout_s",
              "rollout.transfer_bucket_mib"):
        assert is_neutral(f)
    assert not is_neutral("rollout.max_staleness")
    on_policy = _plan(tmp_path, placement="separate", generation_ranks=2)
    ahead = _plan(tmp_path, placement="separate", generation_ranks=2, max_staleness=1)
    rl = next(s for s in on_policy.stages if hasattr(s, "rollout_correction"))
    assert rl.rollout_correction.mode == "auto"
    assert stage_fingerprint(on_policy, rl)["rollout_correction.mode"] == "none"  # as plans before "auto" recorded
    rl_ahead = next(s for s in ahead.stages if s.name == rl.name)
    assert stage_fingerprint(ahead, rl_ahead)["rollout_correction.mode"] == "tis"


def test_rejection_sft_rounds_separate_on_policy_only(tmp_path):
    """teacher_sft's rounds may sample on generation ranks of their own, with the weights of every update before the
    round (k = 0); running ahead is refused, naming the field."""
    d = copy.deepcopy(BASE)
    d["launch"] = {"procs_per_node": 4}
    d["stages"] = [{"name": "t_sft", "kind": "teacher_sft", "split": "1H", "sft": {"source": "rejection"},
                    "rollout": {"engine": "megatron", "placement": "separate", "generation_ranks": 2}}]
    assert load_plan(_write(tmp_path, d)).stages[0].rollout.placement == "separate"
    d["stages"][0]["rollout"]["max_staleness"] = 1
    with pytest.raises(S2DError, match=r"stages.t_sft.rollout.max_staleness = 1: a rejection round samples with the "
                                       r"weights of every update before it"):
        load_plan(_write(tmp_path, d))
