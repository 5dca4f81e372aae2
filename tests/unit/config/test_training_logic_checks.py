"""Plan-load checks of the training logic: top-k OPD with a task reward is refused (its loss never reads the reward,
yet the stage graded samples and counted its labels), each rollout-correction mode has its own band, the dual clip's
bound, and a warning (not an error) for truncated sampling in a policy-gradient stage."""

import copy
import warnings

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.config.schema import OPDConfig, OPDStageConfig
from megatron_s2d.config.validate import PlanWarning, label_ledger
from megatron_s2d.errors import S2DError

BASE = {
    "name": "t", "run_dir": "runs/t",
    "models": {"teacher": {"hf": "/x/teacher"}, "student": {"hf": "/x/student"}},
    "stage_defaults": {"steps": 2, "prompts_per_step": 4, "samples_per_prompt": 2},
    "stages": [
        {"name": "t_rl", "kind": "teacher_rl", "split": "1H"},
        {"name": "opd", "kind": "opd", "teacher": "t_rl", "split": "2H"},
    ],
}


def _plan(tmp_path, **stage_changes):
    """BASE with ``stage_changes`` = {stage name: {key: value}} merged into those stages; loaded and validated."""
    d = copy.deepcopy(BASE)
    for s in d["stages"]:
        s.update(stage_changes.get(s["name"], {}))
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_plan(p)


# ------------------------------------------------------------------------------- 7: top-k OPD reads no task reward
def test_topk_opd_with_a_task_reward_is_refused(tmp_path):
    with pytest.raises(S2DError, match=r"stages\.opd\.opd\.task_reward_coef = 0\.5: .*opd\.mode 'topk' does not "
                                       r"read it"):
        _plan(tmp_path, opd={"opd": {"mode": "topk", "task_reward_coef": 0.5}})


def test_the_ledger_counts_labels_only_where_the_loss_reads_them(tmp_path):
    sampled = _plan(tmp_path, opd={"opd": {"mode": "sampled", "task_reward_coef": 0.5}})
    assert label_ledger(sampled)["opd"] == ["1H", "2H"]  # its own split's labels, and its teacher's
    topk = _plan(tmp_path, opd={"opd": {"mode": "topk"}})
    assert label_ledger(topk)["opd"] == ["1H"]  # the teacher's only
    # the registry fact itself, even for a config that never went through validation
    assert not OPDStageConfig(name="o", teacher="base", opd=OPDConfig(mode="topk",
                                                                     task_reward_coef=0.5)).consumes_labels()
    assert OPDStageConfig(name="o", teacher="base", opd=OPDConfig(task_reward_coef=0.5)).consumes_labels()


# ------------------------------------------------------------------------------- 8: one band per correction mode
def test_each_correction_mode_has_its_band(tmp_path):
    plan = _plan(tmp_path, t_rl={"rollout_correction": {"mode": "icepop", "icepop_low": 0.4, "icepop_high": 3.0}})
    c = plan.stages[0].rollout_correction
    assert (c.low, c.high, c.icepop_low, c.icepop_high) == (0.999, 1.001, 0.4, 3.0)
    with pytest.raises(S2DError, match=r"stages\.t_rl\.rollout_correction: low / high = \[0\.3, 3\.0\] .* mode "
                                       r"icepop reads icepop_low / icepop_high"):
        _plan(tmp_path, t_rl={"rollout_correction": {"mode": "icepop", "low": 0.3, "high": 3.0}})
    with pytest.raises(S2DError, match=r"icepop_low <= 1 <= icepop_high"):
        _plan(tmp_path, t_rl={"rollout_correction": {"mode": "icepop", "icepop_low": 1.5}})
    with pytest.raises(S2DError, match=r"low <= 1 <= high"):
        _plan(tmp_path, opd={"rollout_correction": {"mode": "seq_mask_tis", "low": 1.01}})


# ------------------------------------------------------------------------------- 10: dual clip, truncated sampling
def test_dual_clip_bound(tmp_path):
    assert _plan(tmp_path).stages[0].clip.dual_clip_c == 3.0  # verl's default
    assert _plan(tmp_path, t_rl={"clip": {"dual_clip_c": 0}}).stages[0].clip.dual_clip_c == 0  # off
    with pytest.raises(S2DError, match=r"stages\.t_rl\.clip\.dual_clip_c = 1\.0: .* must be > 1"):
        _plan(tmp_path, t_rl={"clip": {"dual_clip_c": 1.0}})


def _plan_warnings(tmp_path, **stage_changes) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _plan(tmp_path, **stage_changes)
    return [str(w.message) for w in caught if issubclass(w.category, PlanWarning)]


def test_truncated_sampling_in_a_policy_gradient_stage_is_warned_about(tmp_path):
    assert _plan_warnings(tmp_path) == []
    got = _plan_warnings(tmp_path, t_rl={"rollout": {"top_p": 0.95}}, opd={"rollout": {"top_k": 20}})
    assert len(got) == 2
    assert "stages.t_rl samples truncated (rollout.top_p = 0.95, rollout.top_k = 0)" in got[0]
    assert "set rollout.top_p: 1 and rollout.top_k: 0" in got[0]
    assert "stages.opd samples truncated (rollout.top_p = 1.0, rollout.top_k = 20)" in got[1]
    # top-k OPD trains no policy gradient: nothing to say
    assert _plan_warnings(tmp_path, opd={"opd": {"mode": "topk"}, "rollout": {"top_k": 20}}) == []
