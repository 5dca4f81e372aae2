"""Every layout error a stage job would raise at step 0 is raised when the plan is loaded and by the dry run,
naming the stage and the field; temperatures a training stage cannot use are refused at load; renamed keys say what
to write instead."""

import copy
from pathlib import Path

import pytest
import yaml

from megatron_s2d.config import load_plan
from megatron_s2d.errors import S2DError
from tests.unit.config.test_plan_config import BASE, _write

ROOT = Path(__file__).resolve().parents[3]


def test_prompts_per_step_must_divide_over_the_trained_models_dp_ranks():
    # Qwen3-8B teacher at TP2 on 8 GPUs: DP 4; 3 prompts per step passed --dry-run, then failed at step 0
    with pytest.raises(S2DError, match=r"stages.teacher_rl.prompts_per_step = 3 does not divide over the 4 "
                                       r"data-parallel ranks of models.teacher"):
        load_plan(ROOT / "run_configs" / "qwen3_8b_to_1.7b.yaml", ["stages.teacher_rl.prompts_per_step=3"])


def test_dry_run_raises_it_too(tmp_path):
    from megatron_s2d.launch import dry_run

    plan = load_plan(ROOT / "run_configs" / "qwen3_8b_to_1.7b.yaml", [f"run_dir={tmp_path / 'r'}"])
    plan.stages[0].prompts_per_step = 3  # past load-time validation: the dry run checks on its own
    with pytest.raises(S2DError, match="prompts_per_step = 3"):
        dry_run(plan, stages=["teacher_rl"], executor="slurm", out=open("/dev/null", "w"))


def test_warmup_rows_are_teacher_samples_not_samples_per_prompt(tmp_path):
    d = copy.deepcopy(BASE)
    # 4 prompts x 1 teacher sample = 4 rows, 8 updates: would have trained on nothing; samples_per_prompt (2) and
    # the old check (prompts x samples_per_prompt % updates == 0: 4 x 2 % 8 == 0) said nothing
    d["stages"][1].update(warmup={"teacher_samples_per_prompt": 1}, updates_per_step=8)
    with pytest.raises(S2DError, match=r"stages.fkl.updates_per_step = 8 exceeds the 4 sequences .*"
                                       r"warmup.teacher_samples_per_prompt"):
        load_plan(_write(tmp_path, d))
    d["stages"][1]["warmup"]["teacher_samples_per_prompt"] = 2
    load_plan(_write(tmp_path, d))  # 8 rows, 8 updates: fine


def test_uneven_mini_batches_are_allowed():
    d = copy.deepcopy(BASE)
    d["stages"][0]["updates_per_step"] = 3  # 4 x 2 = 8 rows in 3 updates: 3 / 3 / 2 rows
    load_plan(_write(Path(pytest.importorskip("tempfile").mkdtemp()), d))


@pytest.mark.parametrize("kind_index", [0, 1, 2, 3])
def test_greedy_temperature_is_refused_for_every_training_stage(tmp_path, kind_index):
    d = copy.deepcopy(BASE)
    name = d["stages"][kind_index]["name"]
    with pytest.raises(S2DError, match=rf"stages.{name}.rollout.temperature = 0.0"):
        load_plan(_write(tmp_path, d), [f"stages.{name}.rollout.temperature=0"])


def test_topk_reverse_kl_has_no_tail_switch(tmp_path):
    """The top-k reverse KL without its tail bucket pushes mass out of the top-k: OPD has no switch for it (the loss
    function refuses tail=False too); the forward top-k KL keeps its switch (without the tail it is a CE)."""
    with pytest.raises(S2DError, match=r"stages.opd.opd: unknown key\(s\) \['tail'\]"):
        load_plan(_write(tmp_path, BASE), ["stages.opd.opd.mode=topk", "stages.opd.opd.tail=false"])
    load_plan(_write(tmp_path, BASE), ["stages.fkl.warmup.tail=false"])


def test_opd_clip_range_is_validated(tmp_path):
    with pytest.raises(S2DError, match=r"stages.opd.clip: eps_low must be in \[0, 1\)"):
        load_plan(_write(tmp_path, BASE), ["stages.opd.clip.eps_low=1.5"])


def test_old_keys_say_what_to_write(tmp_path):
    cases = [("stages.fkl.distill.fkl_mode=sampled", r"stages.fkl.distill was renamed: write warmup: \{mode"),
             ("stages.opd.distill.opd_mode=topk", r"stages.opd.distill was renamed: write opd: \{mode"),
             ("stages.t_rl.grpo.eps_low=0.1", r"grpo.eps_low was renamed: write the stage's clip"),
             ("stages.fkl.samples_per_prompt=3", r"stages.fkl.samples_per_prompt was renamed: write "
                                                 r"warmup.teacher_samples_per_prompt"),
             ("stages.opd.rollout.logprob_topk=3", r"rollout.logprob_topk was renamed: write nothing")]
    for override, match in cases:
        with pytest.raises(S2DError, match=match):
            load_plan(_write(tmp_path, BASE), [override])


def test_renamed_key_says_what_to_write(tmp_path):
    with pytest.raises(S2DError, match=r"optim.warmup_steps was renamed: write warmup_updates"):
        load_plan(_write(tmp_path, BASE), ["stages.opd.optim.warmup_steps=3"])
