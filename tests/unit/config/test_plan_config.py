"""Plan loading: inheritance, overrides, typing errors, DAG and label-hygiene validation."""

from pathlib import Path

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.config.validate import label_ledger, topo_order
from megatron_s2d.errors import S2DError

ROOT = Path(__file__).resolve().parents[3]

BASE = {
    "name": "t", "run_dir": "runs/t",
    "models": {"teacher": {"hf": "/x/teacher"}, "student": {"hf": "/x/student"}},
    "stage_defaults": {"steps": 2, "prompts_per_step": 4, "samples_per_prompt": 2},
    "stages": [
        {"name": "t_rl", "kind": "teacher_rl", "split": "1H"},
        {"name": "fkl", "kind": "fkl_warmup", "teacher": "t_rl", "split": "1H"},
        {"name": "opd", "kind": "opd", "init": "fkl", "teacher": "t_rl", "split": "1H"},
        {"name": "s_rl", "kind": "student_rl", "init": "opd", "split": "2H"},
    ],
}


def _write(tmp_path, data, name="plan.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _with(**changes):
    import copy

    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def test_defaults_overrides_and_order(tmp_path):
    plan = load_plan(_write(tmp_path, BASE), ["stages.opd.steps=7", "eval.k=4", "stages.s_rl.optim.lr=2e-5"])
    by = {s.name: s for s in plan.stages}
    assert by["opd"].steps == 7 and by["fkl"].steps == 2 and by["s_rl"].samples_per_prompt == 2
    assert plan.eval.k == 4 and by["s_rl"].optim.lr == 2e-5
    assert [s.name for s in topo_order(plan)] == ["t_rl", "fkl", "opd", "s_rl"]
    assert label_ledger(plan)["s_rl"] == ["1H", "2H"] and label_ledger(plan)["opd"] == ["1H"]


def test_base_inheritance(tmp_path):
    _write(tmp_path, BASE, "base.yaml")
    plan = load_plan(_write(tmp_path, {"base": "base.yaml", "name": "child", "eval": {"k": 2}}))
    assert plan.name == "child" and plan.eval.k == 2 and len(plan.stages) == 4


@pytest.mark.parametrize("data,match", [
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "nope", "split": "1H"}]), r"stages\.x\.kind = 'nope'"),
    (_with(stages=[{"name": "a", "kind": "student_rl", "init": "b", "split": "1H"},
                   {"name": "b", "kind": "student_rl", "init": "a", "split": "2H"}]), "cycle: a -> b -> a|cycle: b -> a -> b"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student_rl", "init": "ghost", "split": "2H"}]),
     "init = 'ghost' names no stage"),
    (_with(stages=BASE["stages"] + [{"name": "reuse", "kind": "student_rl", "init": "opd", "split": "1H"}]),
     "reuse the labels of split '1H'"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "opd", "split": "1H"}]), "teacher is required"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student_rl", "init": "t_rl", "split": "2H"}]),
     "trains the student, but stage 't_rl' trains the teacher"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student_rl", "split": "3H"}]), "not a data split"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student_rl", "split": "1H+3H"}]), "not a data split"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student_rl", "split": "2H+2H"}]), "union of distinct"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student_rl", "init": "opd", "split": "2H+1H"}]),
     "reuse the labels of split '1H'"),
    (_with(stages=[dict(BASE["stages"][0], samples_per_prompt=1)]), "group of >= 2"),
    (_with(stages=[dict(BASE["stages"][0], updates_per_step=9)]), "updates_per_step = 9 exceeds the 8 sequences"),
    (_with(models={"teacher": {"hf": "/x", "tp": 3}, "student": {"hf": "/y"}}), "does not divide the world size"),
    (_with(eval={"k": "many"}), r"eval\.k: expected an integer"),
    (_with(surprise=1), r"unknown key\(s\) \['surprise'\]"),
    # per-kind configs: a key of another kind is refused, naming the stage and what the kind allows
    (_with(stages=[dict(BASE["stages"][0], warmup={"topk": 4})]), r"stages.t_rl: unknown key\(s\) \['warmup'\]"),
    (_with(stage_defaults={"bogus": 1}), r"stage_defaults: key\(s\) \['bogus'\] belong to no stage kind"),
])
def test_bad_plans_fail_with_named_field(tmp_path, data, match):
    with pytest.raises(S2DError, match=match):
        load_plan(_write(tmp_path, data))


def test_replay_allows_label_reuse(tmp_path):
    data = _with(stages=BASE["stages"] + [{"name": "replay", "kind": "student_rl", "init": "opd", "split": "1H",
                                            "replay": True, "control": "matched_replay"}])
    plan = load_plan(_write(tmp_path, data))
    assert label_ledger(plan)["replay"] == ["1H"]


def test_union_split_consumes_every_part(tmp_path):
    """The allocation contrast's teacher RL on all labels ('1H+2H'): its lineage consumed both halves."""
    stages = [{"name": "t_all", "kind": "teacher_rl", "split": "1H+2H"},
              {"name": "fkl_all", "kind": "fkl_warmup", "teacher": "t_all", "split": "1H+2H"}]
    plan = load_plan(_write(tmp_path, _with(stages=stages)))
    assert label_ledger(plan) == {"t_all": ["1H", "2H"], "fkl_all": ["1H", "2H"]}  # through its teacher


def test_opd_with_task_reward_consumes_labels(tmp_path):
    stages = [dict(s) for s in BASE["stages"]]
    stages[2]["opd"] = {"task_reward_coef": 0.5}
    stages[2]["split"] = "2H"
    stages[3]["split"] = "2H"
    with pytest.raises(S2DError, match="already consumed by ancestor stage 'opd'"):
        load_plan(_write(tmp_path, _with(stages=stages)))


def test_override_errors(tmp_path):
    p = _write(tmp_path, BASE)
    with pytest.raises(S2DError, match="no stage named 'ghost'"):
        load_plan(p, ["stages.ghost.steps=1"])
    with pytest.raises(S2DError, match="expected key=value"):
        load_plan(p, ["stages.opd.steps"])


def test_shipped_toy_plan_loads():
    plan = load_plan(ROOT / "run_configs" / "toy_cpu.yaml")
    kinds = {s.kind for s in plan.stages}
    assert kinds == {"teacher_rl", "fkl_warmup", "opd", "student_rl"}
    assert {"cold_grpo", "opd_only", "teacher_sample_sft"} <= {s.control for s in plan.stages}


def _two_layouts(teacher=None, student=None, **extra):
    d = _with(**extra)
    d["launch"] = {"nodes": 1, "procs_per_node": 8}
    d["stage_defaults"] = {**d["stage_defaults"], "prompts_per_step": 8}  # divides over 8 data-parallel ranks
    d["models"]["teacher"].update(teacher or {})
    d["models"]["student"].update(student or {})
    return d


def test_rollout_engine_auto_is_decided_where_the_job_runs(tmp_path):
    """auto stays auto in the plan (a login node may lack vLLM that the job's environment has): vLLM for every
    layout where it imports, the megatron sampler otherwise."""
    from megatron_s2d.config.validate import engine_for

    d = _two_layouts(teacher={"tp": 2, "pp": 2}, stage_defaults={**BASE["stage_defaults"], "rollout": {"engine": "auto"}})
    plan = load_plan(_write(tmp_path, d))
    assert {s.rollout.engine for s in plan.stages} == {"auto"}
    rollout = plan.stages[0].rollout
    assert engine_for(rollout, vllm_installed=True) == "vllm" and engine_for(rollout, vllm_installed=False) == "megatron"
    rollout.engine = "megatron"
    assert engine_for(rollout, vllm_installed=True) == "megatron"


def test_vllm_serves_every_layout_and_its_tp_must_divide_the_world(tmp_path):
    d = _two_layouts(teacher={"tp": 2, "pp": 2}, stage_defaults={**BASE["stage_defaults"], "rollout": {"engine": "vllm"}})
    load_plan(_write(tmp_path, d))  # a TP2 x PP2 teacher generating with vLLM is fine now
    with pytest.raises(S2DError, match=r"stages.t_rl.rollout.vllm.tp = 3 does not divide the world size 8"):
        load_plan(_write(tmp_path, d), ["stages.t_rl.rollout.vllm.tp=3"])
    with pytest.raises(S2DError, match=r"eval.engine = 'vllm'"):
        load_plan(_write(tmp_path, d), ["eval.engine=vllm"])


def test_vllm_memory_share_is_derived_unless_set_and_a_set_one_is_a_fraction(tmp_path):
    """Unset (the default), the stage job derives vLLM's share from the memory estimate (models.memory); a set one
    must be a fraction of the GPU (whether it fits next to the trainer is the launch checks' business)."""
    plan = load_plan(_write(tmp_path, BASE), ["stages.opd.rollout.vllm.gpu_memory_utilization=0.6"])
    assert [s.rollout.vllm.gpu_memory_utilization for s in plan.stages] == [None, None, 0.6, None]
    for bad in ("0", "1.5"):
        with pytest.raises(S2DError, match=r"stages.opd.rollout.vllm: gpu_memory_utilization must be in \(0, 1\]"):
            load_plan(_write(tmp_path, BASE), [f"stages.opd.rollout.vllm.gpu_memory_utilization={bad}"])


@pytest.mark.parametrize("data, overrides, match", [
    (_with(stages=[dict(BASE["stages"][0], optim={"lrr": 1e-5})]), [],
     r"stages\.t_rl\.optim: unknown key\(s\) \['lrr'\] \(did you mean 'lr'\?\)"),
    (BASE, ["models.teacher.tpp=2"], r"models\.teacher: unknown key\(s\) \['tpp'\] \(did you mean 'tp'\?\)"),
    (BASE, ["evall.k=2"], r"unknown key\(s\) \['evall'\] \(did you mean 'eval'\?\)"),
    (BASE, ["stages.opd.stepz=3"], r"stages\.opd: unknown key\(s\) \['stepz'\] \(did you mean 'steps'\?\)"),
    (BASE, ["stages.opdd.steps=2"], r"no stage named 'opdd' \(did you mean 'opd'\?\); stages"),
    (_with(stages=BASE["stages"] + [{"name": "x", "kind": "student-rl", "split": "2H"}]), [],
     r"stages\.x\.kind = 'student-rl' \(did you mean 'student_rl'\?\)"),
    (_with(stage_defaults={"stepz": 2, "rolout": {}}), [],
     r"stage_defaults: key\(s\) \['rolout', 'stepz'\] \(did you mean 'rollout' for 'rolout', 'steps' for 'stepz'\?\)"),
    (BASE, ["zzzz=1"], r"unknown key\(s\) \['zzzz'\]; allowed"),  # nothing close: no guess
])
def test_an_unknown_key_names_the_closest_known_one(tmp_path, data, overrides, match):
    with pytest.raises(S2DError, match=match):
        load_plan(_write(tmp_path, data), overrides)
