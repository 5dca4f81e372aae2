"""The report's paired comparisons: which contrasts the lineage yields, the paired difference and its standard error,
no pairing across different problems, and the files written (tables, plots)."""

import json
import math

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.eval.metrics import paired_difference
from megatron_s2d.run.report import collect, contrasts, write_report
from megatron_s2d.stages.layout import BASE_EVAL, RunLayout

PROBLEMS = "abc123"


def _ev(scores, problems=PROBLEMS):
    n = len(scores)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)
    return {"toy-test": {"avg": mean, "stderr": se, "n_problems": n, "k": 4, "scores": scores, "problems": problems}}


# (name, kind, model, init, control, scores)
STAGES = [
    ("teacher_rl", "teacher_rl", "teacher", "base", None, [1.0, 1.0, 0.75, 0.5]),
    ("fkl_warmup", "fkl_warmup", "student", "base", None, [0.5, 0.5, 0.25, 0.25]),
    ("opd", "opd", "student", "fkl_warmup", None, [0.75, 0.5, 0.5, 0.25]),
    ("student_rl", "student_rl", "student", "opd", None, [0.75, 0.75, 0.5, 0.25]),
    ("cold_grpo", "student_rl", "student", "base", "cold_grpo", [0.25, 0.0, 0.25, 0.0]),
    ("teacher_rl_all", "teacher_rl", "teacher", "base", "allocation_all", [1.0, 0.75, 0.75, 0.5]),
    ("fkl_warmup_all", "fkl_warmup", "student", "base", "allocation_all", [0.5, 0.5, 0.5, 0.25]),
    ("opd_all", "opd", "student", "fkl_warmup_all", "allocation_all", [0.75, 0.75, 0.5, 0.5]),
]


@pytest.fixture
def run(tmp_path):
    layout = RunLayout.of(tmp_path / "run")
    (layout.stage(BASE_EVAL)).mkdir(parents=True)
    (layout.stage(BASE_EVAL) / "eval.json").write_text(json.dumps({
        "teacher_base": {"label": "teacher_base", "results": _ev([0.75, 0.5, 0.5, 0.25])},
        "student_base": {"label": "student_base", "results": _ev([0.0, 0.25, 0.0, 0.0])}}))
    for name, kind, model, init, control, scores in STAGES:
        d = layout.stage(name)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"label": name, "results": _ev(scores)}))
        (d / "lineage.json").write_text(json.dumps({
            "stage": name, "kind": kind, "control": control, "policy_model": model, "parents": {"init": init},
            "labels_used_by_lineage": [], "ledger": {"labels_consumed": 0}, "ancestor_ledgers": {}}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    return layout


def test_contrasts_follow_the_lineage(run):
    pairs = [(a, b) for a, b, _ in contrasts(collect(run)["rows"])]
    # 1. what each stage added
    for a, b in [("teacher_rl", "teacher_base"), ("fkl_warmup", "student_base"), ("opd", "fkl_warmup"),
                 ("student_rl", "opd"), ("cold_grpo", "student_base"), ("opd_all", "fkl_warmup_all")]:
        assert (a, b) in pairs
    # 2. controls vs the main route's stage of the same kind; 3. the allocation contrast (final vs final)
    for a, b in [("cold_grpo", "student_rl"), ("teacher_rl_all", "teacher_rl"), ("opd_all", "opd"),
                 ("opd_all", "student_rl")]:
        assert (a, b) in pairs
    assert len(pairs) == len(set(pairs))


def test_paired_difference_and_its_standard_error(run):
    data = collect(run)
    row = next(p for p in data["paired"] if (p["a"], p["b"]) == ("student_rl", "cold_grpo") or
               (p["a"], p["b"]) == ("cold_grpo", "student_rl"))
    d = [c - s for c, s in zip([0.25, 0.0, 0.25, 0.0], [0.75, 0.75, 0.5, 0.25])]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    assert row["diff"] == pytest.approx(mean) and row["stderr"] == pytest.approx(se)
    # pairing removes the shared between-problem variance: the paired se is below the unpaired one
    a, b = data["rows"][0]["evals"]["toy-test"], data["rows"][1]["evals"]["toy-test"]
    assert paired_difference([1, 0.5, 1, 0.5], [0.5, 0, 0.5, 0]).stderr == 0.0


def test_no_pairing_across_different_problems(run):
    d = run.stage("cold_grpo")
    (d / "eval.json").write_text(json.dumps({"results": _ev([0.25, 0.0, 0.25, 0.0], problems="other")}))
    assert not [p for p in collect(run)["paired"] if "cold_grpo" in (p["a"], p["b"])]


def test_the_grader_is_in_the_header_and_no_pairing_across_graders(run):
    """eval.json records its grader; one written before it did was math-verify's. Two routes scored by different
    graders are not paired (a grader change would show up as a difference)."""
    assert "| toy-test avg@k ± se (math_verify) |" in write_report(run.root)[0]
    d = run.stage("cold_grpo")
    ev = _ev([0.25, 0.0, 0.25, 0.0])
    ev["toy-test"]["grader"] = "hendrycks_boxed"
    (d / "eval.json").write_text(json.dumps({"results": ev}))
    assert not [p for p in collect(run)["paired"] if "cold_grpo" in (p["a"], p["b"])]
    assert "| toy-test avg@k ± se (hendrycks_boxed/math_verify) |" in write_report(run.root)[0]


def test_report_files(run):
    md, plots = write_report(run.root)
    assert "| student_rl − opd | toy-test | +" in md and "z |" in md
    assert {p.name for p in plots} == {"training_curves.png", "accuracy_per_route.png", "paired_differences.png"}
    saved = json.loads((run.report / "report.json").read_text())
    assert {"rows", "paired"} <= set(saved) and saved["paired"]


def test_paired_difference_validation():
    with pytest.raises(S2DError, match="equally long"):
        paired_difference([0.5, 0.5], [0.5])
    one = paired_difference([0.5], [0.25])
    assert one.mean == 0.25 and math.isnan(one.stderr)


def test_report_goes_to_out_and_leaves_the_run_folder_as_it_was(run, tmp_path):
    from tests.unit.run._run_folder import snapshot

    before = snapshot(run.root)
    md, plots = write_report(run.root, tmp_path / "elsewhere" / "report")
    assert (tmp_path / "elsewhere" / "report" / "report.md").read_text() == md + "\n"
    assert all(p.parent == tmp_path / "elsewhere" / "report" for p in plots)
    assert snapshot(run.root) == before


def test_an_unwritable_report_folder_is_named_with_the_way_out(run):
    run.report.write_text("a file where the report folder goes")  # as root, the one way to make it unwritable
    with pytest.raises(S2DError, match=rf"^{run.report}: cannot write the report there \(.*\): pass --out DIR"):
        write_report(run.root)


@pytest.mark.parametrize("stage, file, text, match", [
    ("opd", "lineage.json", '{"stage": "opd", "kind": "o', r"damaged JSON \(Unterminated string"),
    ("opd", "lineage.json", '{"stage": "opd", "kind": "opd"}', r"damaged \(field 'ledger' missing"),
    ("opd", "eval.json", '{"results": ', r"damaged JSON \(Expecting value"),
    ("opd", "eval.json", '[1, 2]', r"damaged \(field .* of the wrong type"),
    ("opd", "metrics.jsonl", '{"step": 1}\n{"step": 2, "re', r"damaged JSON at line 2"),
    (BASE_EVAL, "eval.json", '{"teacher_base": {"label": "x"}}', r"damaged \(field 'results' missing"),
])
def test_a_damaged_file_is_named(run, stage, file, text, match):
    path = run.stage(stage) / file
    path.write_text(text)
    with pytest.raises(S2DError, match=rf"^{path}: {match}.*s2d run PLAN --restart STAGE"):
        collect(run)


def test_the_report_states_the_plans_eval_settings(run):
    import yaml

    md, _ = write_report(run.root)
    assert "Evaluation settings: not recorded (the run folder has no plan.resolved.yaml)." in md
    run.plan.write_text(yaml.safe_dump({"grader": "hendrycks_boxed", "eval": {
        "k": 16, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 16384, "engine": "megatron"}}))
    md, _ = write_report(run.root)
    assert ("Evaluation (from the plan): k 16, temperature 0.7, top_p 0.8, top_k 20, max_new_tokens 16384, grader "
            "hendrycks_boxed.") in md
