"""Every shipped plan holds the paper's routes, by kind and control, and the report places them on the paper's rows
(``run.paper.route_features``, which reads what a route is off the plan and its lineage, never its name).

Rows are built from each plan the way ``run.report.collect`` builds them from a run folder's lineage.json files
(route, kind, control, trained model, init, split, teacher, the splits whose labels its lineage consumed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.run import paper

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "run_configs"
PLANS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("base_"))
GPU = [p for p in PLANS if not p.startswith("toy_")]
# the recipes built on base_gpu.yaml's whole graph (teacher -> student, every route of Tables 3-6 or 8)
FULL_GRAPH = ["qwen3_8b_to_1.7b.yaml", "qwen3_14b_to_1.7b.yaml", "llama3.3_70b_to_llama3.1_8b.yaml"]
MAIN = {"teacher_rl", "fkl_warmup", "opd", "student_rl"}  # the main route: the only stages without a control


def _rows(plan) -> list[dict]:
    st = {s.name: s for s in plan.stages}

    def labels(name) -> set[str]:
        if name in (None, "base"):
            return set()
        s = st[name]
        own = set(s.split.split("+")) if s.consumes_labels() else set()
        return own | labels(s.init) | labels(s.teachers()[0] if s.teachers() else None)

    rows = []
    for s in plan.stages:
        model = s.trains
        rows.append({"route": s.name, "kind": s.kind, "control": s.control, "model": model,
                     "init": f"{model}_base" if s.init == "base" else s.init, "split": s.split,
                     "teacher": s.teachers()[0] if s.teachers() else None, "labels_splits": sorted(labels(s.name)),
                     "evals": {}})
    return rows


def _matched(name: str) -> dict[str, list[str]]:
    """{paper row id: this plan's routes on it}."""
    plan = load_plan(CONFIGS / name, ["run_dir=/tmp/unused"])
    rows, d = _rows(plan), dataclasses.asdict(plan)
    feats = paper.route_features(rows, d)
    return {row["id"]: [r for r, f in feats.items() if all(f.get(k) == v for k, v in row["match"].items())]
            for row in paper.figures()["rows"]}


def _features(name: str) -> dict[str, tuple]:
    plan = load_plan(CONFIGS / name, ["run_dir=/tmp/unused"])
    feats = paper.route_features(_rows(plan), dataclasses.asdict(plan))
    return {r: (f["route"], f.get("bridge"), f.get("teacher"), f["data"]) for r, f in feats.items()}


@pytest.mark.parametrize("name", FULL_GRAPH + ["toy_cpu_all.yaml"])
def test_plan_holds_the_sft_teacher_half_split_and_allocation_routes(name):
    plan = load_plan(CONFIGS / name, ["run_dir=/tmp/unused"])
    st = {s.name: s for s in plan.stages}
    sft = st["teacher_sft"]  # named teacher_sft in every shipped plan
    assert sft.kind == "teacher_sft" and sft.split == "1H" and sft.control
    assert sft.sft.source == ("solutions" if name.startswith("toy_") else "rejection")  # DAPO has no solutions
    warm = [s for s in plan.stages if s.kind == "fkl_warmup" and s.teacher == "teacher_sft"]
    opd = [s for s in plan.stages if s.kind == "opd" and s.teacher == "teacher_sft" and s.init in {w.name for w in warm}]
    assert len(opd) == 1 and opd[0].split == "1H"
    after = {(s.split, s.replay) for s in plan.stages if s.kind == "student_rl" and s.init == opd[0].name}
    assert after == {("2H", False), ("1H", True)}  # Table 5: GRPO on held-out 2H, and its matched replay
    assert any(s.kind == "teacher_rl" and s.split == "1H+2H" for s in plan.stages)  # the full-data allocation route
    assert all(s.control for s in plan.stages if s.name not in MAIN)  # every control route is named for the report
    want = {("bridge", "two_stage", "sft", "half"), ("bridge_then_grpo", "two_stage", "sft", "half"),
            ("bridge_then_replay", "two_stage", "sft", "half"), ("bridge", "two_stage", "rl", "full"),
            ("bridge_then_grpo", "opd_only", "rl", "half"), ("bridge_then_grpo", "teacher_sample_sft", "rl", "half"),
            ("bridge_then_replay", "two_stage", "rl", "half"), ("bridge", "two_stage", "raw", "half")}
    assert want <= set(_features(name).values())


@pytest.mark.parametrize("name", ["qwen3_8b_to_1.7b.yaml", "qwen3_14b_to_1.7b.yaml"])
def test_qwen_recipes_cover_every_row_of_tables_3_to_6(name):
    matched = _matched(name)
    size = "8b" if "8b" in name else "14b"
    rows = [r["id"] for r in paper.figures()["rows"] if r["table"] in "3456" and r["id"] != "t3_same_size"]
    assert all(len(matched[r]) == 1 for r in rows), {r: matched[r] for r in rows}
    assert matched["t3_sft_bridge"] == ["sft_opd_all"] and matched["t5_grpo_2h"] == ["sft_student_rl"]
    assert matched["t5_matched_replay"] == ["sft_matched_replay"] and matched["t3_rl_bridge"] == ["opd_all"]
    assert matched[f"t2_grpo_qwen3_{size}"] == ["teacher_rl_all"]  # teacher GRPO on all of DAPO is Table 2's
    assert matched["t3_same_size"] == []


def test_llama_recipe_covers_table_8():
    matched = _matched("llama3.3_70b_to_llama3.1_8b.yaml")
    assert matched["t8_rl_bridge"] and matched["t8_raw_bridge"] and matched["t8_direct_grpo"]
    assert not any(v for k, v in matched.items() if not k.startswith("t8_"))  # Qwen rows: not this family


@pytest.mark.parametrize("size", ["1.7b", "8b", "14b"])
def test_size_ladder_plans(size):
    name = f"grpo_qwen3_{size}.yaml"
    plan = load_plan(CONFIGS / name, ["run_dir=/tmp/unused"])
    assert [(s.kind, s.split, s.control) for s in plan.stages] == [("student_rl", "1H+2H", "direct_grpo")]
    assert _matched(name)[f"t2_grpo_qwen3_{size}"] == ["direct_grpo"]


def test_same_size_plan():
    matched = _matched("qwen3_1.7b_to_1.7b.yaml")
    assert matched["t3_same_size"] == ["opd_all"] and matched["t3_rl_bridge"] == []
    assert matched["t3_direct_grpo"] == ["cold_grpo_all"]


@pytest.mark.parametrize("name", GPU)
def test_gpu_plans_set_their_eval_sampling(name):
    """Each GPU plan sets eval sampling in its own file (the authors' public eval settings; sources in comments)."""
    import yaml

    assert "eval" in yaml.safe_load((CONFIGS / name).read_text())
    ev = load_plan(CONFIGS / name, ["run_dir=/tmp/unused"]).eval
    assert (ev.k, ev.temperature, ev.top_p, ev.top_k, ev.max_new_tokens) == (16, 0.7, 0.8, 20, 16384)
