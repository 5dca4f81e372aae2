"""The ``teacher_sft`` kind: its facts in the registry, its config block, its plan-load checks (rounds, renamed keys,
stage_defaults), its labels in the ledger and the reuse check, and its checkpoint as a bridge's teacher."""

import copy

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.config.fingerprint import result_changes, stage_fingerprint
from megatron_s2d.config.schema import SFTConfig, TeacherSFTStageConfig
from megatron_s2d.config.validate import label_ledger
from megatron_s2d.errors import S2DError

BASE = {
    "name": "t", "run_dir": "runs/t",
    "models": {"teacher": {"hf": "/x/teacher"}, "student": {"hf": "/x/student"}},
    "stage_defaults": {"steps": 4, "prompts_per_step": 4, "samples_per_prompt": 2},
    "stages": [
        {"name": "teacher_sft", "kind": "teacher_sft", "split": "1H", "sft": {"source": "rejection", "rounds": 2}},
        {"name": "fkl", "kind": "fkl_warmup", "teacher": "teacher_sft", "split": "1H"},
        {"name": "opd", "kind": "opd", "init": "fkl", "teacher": "teacher_sft", "split": "1H"},
        {"name": "student_rl", "kind": "student_rl", "init": "opd", "split": "2H"},
    ],
}


def _plan(tmp_path, stages=None, overrides=None):
    d = copy.deepcopy(BASE)
    if stages is not None:
        d["stages"] = stages
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_plan(p, overrides)


def test_facts_of_the_kind():
    sol = TeacherSFTStageConfig(name="s")
    rej = TeacherSFTStageConfig(name="r", sft=SFTConfig(source="rejection", samples_per_prompt=6))
    assert sol.kind == "teacher_sft" and sol.sft.source == "solutions" and sol.sft.rounds == 1
    assert sol.trains == rej.samples_from == "teacher" and sol.models() == ["teacher"]
    assert sol.consumes_labels() and rej.consumes_labels()  # the reference solutions / the reward's gold answers
    assert (sol.rows_per_prompt(), rej.rows_per_prompt()) == (1, 6)
    assert sol.reads_solutions() and not rej.reads_solutions()


def test_the_bridge_route_loads_and_its_labels_are_counted(tmp_path):
    plan = _plan(tmp_path)
    by = {s.name: s for s in plan.stages}
    assert isinstance(by["teacher_sft"], TeacherSFTStageConfig) and by["teacher_sft"].sft.rounds == 2
    # stage_defaults.samples_per_prompt is GRPO's / OPD's: it does not reach the SFT stage's own sft block
    assert by["teacher_sft"].sft.samples_per_prompt == SFTConfig().samples_per_prompt
    ledger = label_ledger(plan)
    assert ledger["teacher_sft"] == ["1H"] and ledger["fkl"] == ["1H"] and ledger["student_rl"] == ["1H", "2H"]


def test_reusing_the_sft_teachers_labels_needs_replay(tmp_path):
    stages = copy.deepcopy(BASE["stages"])
    stages[3]["split"] = "1H"
    with pytest.raises(S2DError, match=r"stages\.student_rl would reuse the labels of split '1H', already consumed "
                                       r"by ancestor stage 'teacher_sft'"):
        _plan(tmp_path, stages)
    stages[3]["replay"] = True
    _plan(tmp_path, stages)


@pytest.mark.parametrize("overrides, message", [
    (["stages.teacher_sft.steps=3"], r"stages\.teacher_sft\.steps = 3 does not divide into sft\.rounds = 2"),
    (["stages.teacher_sft.sft.rounds=0"], r"stages\.teacher_sft\.sft: samples_per_prompt and rounds must be >= 1"),
    (["stages.teacher_sft.sft.samples_per_prompt=0"], r"samples_per_prompt and rounds must be >= 1"),
    (["stages.teacher_sft.sft.source=solutions"], r"sft\.rounds = 2 applies to sft\.source: rejection"),
    (["stages.teacher_sft.sft.source=best_of"], r"sft\.source"),
    (["stages.teacher_sft.updates_per_step=33"], r"updates_per_step = 33 exceeds the 32 sequences .* sft"),
])
def test_bad_sft_settings_are_refused_at_plan_load(tmp_path, overrides, message):
    with pytest.raises(S2DError, match=message):
        _plan(tmp_path, overrides=overrides)


def test_stage_level_samples_per_prompt_says_where_it_went(tmp_path):
    stages = copy.deepcopy(BASE["stages"])
    stages[0]["samples_per_prompt"] = 4
    with pytest.raises(S2DError, match=r"sft\.samples_per_prompt"):
        _plan(tmp_path, stages)


def test_a_teacher_must_be_a_stage_that_trains_the_teacher(tmp_path):
    stages = copy.deepcopy(BASE["stages"])
    stages[1]["teacher"] = "student_rl"
    with pytest.raises(S2DError, match=r"stages\.fkl\.teacher = 'student_rl' is a student_rl stage, not one that "
                                       r"trains the teacher"):
        _plan(tmp_path, stages)


def test_the_sft_block_is_in_the_fingerprint(tmp_path):
    """A change of source, samples or rounds changes the stage's result: refused on resume (config drift)."""
    a, b = _plan(tmp_path), _plan(tmp_path, overrides=["stages.teacher_sft.sft.samples_per_prompt=3"])
    fa, fb = (stage_fingerprint(p, p.stages[0]) for p in (a, b))
    assert fa["sft.source"] == "rejection" and fa["sft.rounds"] == 2
    assert result_changes(fa, fb) == [("sft.samples_per_prompt", 8, 3)]
