"""Plan-load refusals of engine settings that used to fail only at stage start, inside the job: the megatron sampler's
``rollout.max_batch_tokens`` and delayed FP8 on a teacher at a layout of its own (its amax all-reduce would span the
job's layout, not the teacher's: issue 17, F3)."""

import copy

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.errors import S2DError

BASE = {
    "name": "t", "run_dir": "runs/t",
    "models": {"teacher": {"hf": "/x/teacher", "tp": 2}, "student": {"hf": "/x/student"}},
    "launch": {"procs_per_node": 2},
    "stage_defaults": {"steps": 2, "prompts_per_step": 4, "samples_per_prompt": 2},
    "stages": [{"name": "t_rl", "kind": "teacher_rl", "split": "1H"},
               {"name": "opd", "kind": "opd", "teacher": "t_rl", "split": "2H"}],
}


def _load(tmp_path, overrides):
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(copy.deepcopy(BASE)))
    return load_plan(p, overrides)


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_max_batch_tokens_must_be_auto_or_positive(tmp_path, value):
    with pytest.raises(S2DError, match=r"stages\.opd\.rollout\.max_batch_tokens"):
        _load(tmp_path, [f"stages.opd.rollout.max_batch_tokens={value}"])
    assert _load(tmp_path, ["stages.opd.rollout.max_batch_tokens=4096"]).stages[1].rollout.max_batch_tokens == 4096


def test_delayed_fp8_teacher_at_its_own_layout_is_refused(tmp_path):
    with pytest.raises(S2DError, match=r"stages\.opd: models\.teacher\.fp8 = 'delayed' .*tp=2 pp=1.*tensorwise"):
        _load(tmp_path, ["models.teacher.fp8=delayed"])
    _load(tmp_path, ["models.teacher.fp8=tensorwise"])  # no cross-rank amax: fine
    _load(tmp_path, ["models.teacher.fp8=delayed", "models.student.tp=2"])  # same layout as the job: fine
