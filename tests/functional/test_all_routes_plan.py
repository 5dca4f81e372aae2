"""``s2d run run_configs/toy_cpu_all.yaml`` (the paper's routes on the toy, README's route table) runs through the console
script, with only sizes shrunk (1 step per stage, 16 eval problems x 2 samples): every route reaches the report,
the labels each route's lineage consumed are the paper's matching, and the report pairs each control with the main
route."""

from __future__ import annotations

import json

import pytest

from tests.functional.conftest import s2d

pytestmark = pytest.mark.functional

ROUTES = {"teacher_rl", "fkl_warmup", "opd", "student_rl", "cold_grpo", "opd_only", "teacher_sample_sft",
          "raw_fkl_warmup", "raw_opd", "matched_replay", "teacher_rl_all", "fkl_warmup_all", "opd_all",
          "teacher_sft", "sft_fkl_warmup", "sft_opd", "sft_student_rl", "sft_matched_replay", "opd_only_grpo",
          "teacher_sample_sft_grpo"}


@pytest.mark.timeout(1500)  # 21 jobs of ~20-45 s each on 2 shared cores (the suite's default is 900 s)
def test_all_routes_plan_through_console_script(tmp_path):
    run = tmp_path / "all"
    s2d("run", "run_configs/toy_cpu_all.yaml", f"run_dir={run}", "stage_defaults.steps=1",
        "stages.teacher_rl_all.steps=1", "data.eval.toy-test.limit=16", "eval.k=2", timeout=1440)
    report = json.loads((run / "report" / "report.json").read_text())
    rows = {r["route"]: r for r in report["rows"]}
    assert ROUTES | {"teacher_base", "student_base"} <= set(rows)

    def labels(stage):
        return json.loads((run / "stages" / stage / "lineage.json").read_text())["labels_used_by_lineage"]

    # the main route spends 1H on the teacher and 2H on the student; the raw-teacher bridge consumes no labels; matched
    # replay spends 1H twice; the allocation contrast spends both halves on the teacher, none left for the student
    assert labels("student_rl") == ["1H", "2H"] and labels("raw_opd") == [] and labels("matched_replay") == ["1H"]
    assert labels("teacher_rl_all") == labels("opd_all") == ["1H", "2H"]
    # the SFT teacher consumes 1H (its solutions); its bridge's student GRPO adds 2H, its matched replay 1H again
    assert labels("teacher_sft") == labels("sft_opd") == labels("sft_matched_replay") == ["1H"]
    assert labels("sft_student_rl") == labels("opd_only_grpo") == ["1H", "2H"]
    assert rows["teacher_sft"]["labels_consumed"] > 0 and rows["sft_matched_replay"]["control"] == "sft_matched_replay"
    pairs = {(p["a"], p["b"]) for p in report["paired"]}
    for pair in [("raw_opd", "opd"), ("raw_opd", "student_rl"), ("matched_replay", "student_rl"),
                 ("cold_grpo", "student_rl"), ("opd_only", "opd"), ("teacher_sample_sft", "fkl_warmup"),
                 ("teacher_rl_all", "teacher_rl"), ("opd_all", "student_rl"), ("teacher_rl", "teacher_base"),
                 ("teacher_sft", "teacher_base"), ("sft_opd", "opd"), ("sft_student_rl", "student_rl"),
                 ("sft_matched_replay", "sft_opd"), ("opd_only_grpo", "student_rl"),
                 ("teacher_sample_sft_grpo", "student_rl")]:
        assert pair in pairs, pair
    assert all(p["n_problems"] == 16 for p in report["paired"])
