"""The report beside the paper: on a synthetic run folder whose eval sets are the paper's, the table lists the run's
routes in the paper's row order with our avg@k +- se, the paper's published figure and ours - paper; a toy run gets
the not-comparable line and no table; the figures load from the installed package (a wheel built from this tree)."""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from megatron_s2d.eval.metrics import paired_difference
from megatron_s2d.run import paper
from megatron_s2d.run.report import collect, write_report
from megatron_s2d.stages.layout import BASE_EVAL, RunLayout

ROOT = Path(__file__).resolve().parents[3]
# eval set name in the plan -> its source (aime24: an alias of aime2024)
SETS = {"math500": "math500", "aime24": "aime2024", "aime2025": "aime2025"}
# (name, kind, init, teacher, split, control, extra plan fields, per-problem scores on every set)
STAGES = [
    ("teacher_rl", "teacher_rl", "base", None, "1H", None, {}, [1.0, 0.75, 0.75, 0.5]),
    ("fkl_warmup", "fkl_warmup", "base", "teacher_rl", "1H", None, {"warmup": {"mode": "topk"}},
     [0.5, 0.5, 0.25, 0.25]),
    ("opd", "opd", "fkl_warmup", "teacher_rl", "1H", None, {}, [0.75, 0.75, 0.5, 0.5]),
    ("student_rl", "student_rl", "opd", None, "2H", None, {}, [1.0, 0.75, 0.5, 0.5]),
    ("cold_grpo", "student_rl", "base", None, "2H", "cold_grpo", {}, [0.5, 0.25, 0.25, 0.0]),
    ("opd_only", "opd", "base", "teacher_rl", "1H", "opd_only", {}, [0.25, 0.25, 0.0, 0.0]),
    ("matched_replay", "student_rl", "opd", None, "1H", "matched_replay", {"replay": True}, [0.75, 0.75, 0.5, 0.25]),
    ("teacher_rl_all", "teacher_rl", "base", None, "1H+2H", "allocation_all", {}, [1.0, 1.0, 0.75, 0.5]),
    ("fkl_warmup_all", "fkl_warmup", "base", "teacher_rl_all", "1H+2H", "allocation_all", {}, [0.5, 0.5, 0.5, 0.25]),
    ("opd_all", "opd", "fkl_warmup_all", "teacher_rl_all", "1H+2H", "allocation_all", {}, [1.0, 0.75, 0.75, 0.5]),
    ("raw_fkl_all", "fkl_warmup", "base", "base", "1H+2H", "raw_teacher_transfer", {}, [0.25, 0.25, 0.25, 0.0]),
    ("raw_opd_all", "opd", "raw_fkl_all", "base", "1H+2H", "raw_teacher_transfer", {}, [0.5, 0.25, 0.25, 0.25]),
    ("cold_grpo_all", "student_rl", "base", None, "1H+2H", "direct_grpo", {}, [0.75, 0.5, 0.5, 0.25]),
]
SCORES = {s[0]: s[-1] for s in STAGES}


def _ev(scores, sets=SETS):
    n = len(scores)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)
    return {name: {"avg": mean, "stderr": se, "n_problems": n, "k": 16, "scores": scores, "problems": "p" + name}
            for name in sets}


def paper_run(root: Path, teacher: str = "Qwen3-8B", sets: dict | None = None, toy_world: bool = False) -> RunLayout:
    """A run folder in the formats a real GPU run writes: the resolved plan (models, split, eval sets, stages),
    base_eval/eval.json and each stage's lineage.json + eval.json."""
    sets = SETS if sets is None else sets
    layout = RunLayout.of(root)
    layout.stage(BASE_EVAL).mkdir(parents=True)
    plan = {"name": "paper-synth", "toy_world": toy_world,
            "models": {"teacher": {"hf": f"/models/{teacher}"}, "student": {"hf": "/models/Qwen3-1.7B"}},
            "data": {"split": {"fractions": {"1H": 0.5, "2H": 0.5}, "seed": 0},
                     "eval": [{"name": n, "source": s, "limit": None} for n, s in sets.items()]},
            "stages": [{"name": n, "kind": k, "init": i, **({"teacher": t} if t else {}), "split": sp, "control": c,
                        **extra} for n, k, i, t, sp, c, extra, _ in STAGES]}
    layout.plan.write_text(yaml.safe_dump(plan, sort_keys=False))
    ev = _ev(SCORES["teacher_rl"], sets)
    (layout.stage(BASE_EVAL) / "eval.json").write_text(json.dumps({
        "teacher_base": {"label": "teacher_base", "results": ev}, "student_base": {"label": "student_base",
                                                                                   "results": ev}}))
    for name, kind, init, teacher_, split, control, _, scores in STAGES:
        d = layout.stage(name)
        d.mkdir(parents=True)
        model = "teacher" if kind.startswith("teacher") else "student"
        (d / "eval.json").write_text(json.dumps({"label": name, "results": _ev(scores, sets)}))
        (d / "lineage.json").write_text(json.dumps({
            "stage": name, "kind": kind, "control": control, "policy_model": model,
            "parents": {"init": init, "teacher": teacher_}, "split": split,
            "labels_used_by_lineage": _labels(name), "ledger": {"labels_consumed": 0}, "ancestor_ledgers": {}}))
    return layout


def _labels(name: str) -> list[str]:
    """The splits whose labels the stage or its ancestors (init and teacher chains) consumed, as lineage.json has
    them (config/validate.py label_ledger): GRPO stages consume their split's labels."""
    if name in (None, "base"):
        return []
    _, kind, init, teacher, split, *_ = next(s for s in STAGES if s[0] == name)
    own = split.split("+") if kind in ("teacher_rl", "student_rl") else []
    return sorted(set(own) | set(_labels(init)) | set(_labels(teacher)))


def _value_lines(lines, set_name="math500"):
    return [ln for ln in lines if ln["what"] == "value" and ln["set"] == set_name]


def test_paper_table_lists_routes_in_the_papers_row_order(tmp_path):
    data = collect(paper_run(tmp_path / "run"))
    lines = data["paper"]["lines"]
    order = [(ln["row"], ln["route"].split(" ")[0]) for ln in _value_lines(lines)]
    assert order == [
        ("t2_grpo_qwen3_1.7b", "cold_grpo_all"),     # Table 2: the size ladder
        ("t2_grpo_qwen3_8b", "teacher_rl_all"),      # (teacher GRPO on all the labels is direct GRPO on the 8B)
        ("t3_raw_bridge", "raw_opd_all"),            # Table 3: full-data endpoints
        ("t3_rl_bridge", "opd_all"),
        ("t3_direct_grpo", "cold_grpo_all"),
        ("t4_bridge_1h", "opd"),                     # Table 4: the half split with the RL'd teacher
        ("t4_grpo_2h", "student_rl"),
        ("t4_cold_grpo_2h", "cold_grpo"),
        ("t4_matched_replay", "matched_replay"),
        ("t6_opd_only_1h", "opd_only"),              # Table 6: which bridge starts student GRPO
    ]
    # the eval sets in the paper's order, under the plan's names (aime24 is the plan's name of aime2024)
    assert [ln["set"] for ln in lines if ln["route"].startswith("opd_all ")] == ["math500", "aime24", "aime2025"]
    # routes on no paper row: the teacher on 1H, and the intermediate top-k warmups
    assert data["paper"]["other"] == ["teacher_rl", "fkl_warmup", "fkl_warmup_all", "raw_fkl_all"]
    assert "Table 5: SFT-trained teacher + bridge on 1H (the bridge alone)" in data["paper"]["missing"]


def test_ours_the_papers_figure_and_the_difference(tmp_path):
    data = collect(paper_run(tmp_path / "run"))
    by = {(ln["row"], ln["set"], ln["what"]): ln for ln in data["paper"]["lines"]}
    for (row, route, set_name, figure) in [("t3_rl_bridge", "opd_all", "math500", 79.3),
                                           ("t3_rl_bridge", "opd_all", "aime24", 25.2),
                                           ("t3_direct_grpo", "cold_grpo_all", "math500", 75.9),
                                           ("t3_direct_grpo", "cold_grpo_all", "aime24", 19.8),
                                           ("t4_bridge_1h", "opd", "math500", 75.4),
                                           ("t4_grpo_2h", "student_rl", "math500", 78.5)]:
        ln = by[(row, set_name, "value")]
        ev = _ev(SCORES[route])[set_name]
        assert ln["ours"] == [ev["avg"], ev["stderr"]]
        assert ln["paper"] == figure and ln["diff"] == pytest.approx(100 * ev["avg"] - figure)
    # no figure: a dash, no difference (AIME 2025 is stated nowhere; Table 2 rows have none)
    for key in [("t3_rl_bridge", "aime2025", "value"), ("t2_grpo_qwen3_8b", "math500", "value"),
                ("t4_cold_grpo_2h", "aime24", "value")]:
        assert by[key]["paper"] is None and by[key]["diff"] is None and by[key]["paper_text"] == "—"
    # a figure stated as a difference of two rows, beside our paired difference of the matching routes
    ln = by[("t3_raw_bridge", "math500", "difference")]
    d = paired_difference(SCORES["raw_opd_all"], SCORES["opd_all"])
    assert (ln["of"], ln["minus"], ln["paper"]) == ("raw_opd_all", "opd_all", -7.8)
    assert ln["ours"] == [d.mean, d.stderr] and ln["diff"] == pytest.approx(100 * d.mean + 7.8)
    ln = by[("t4_matched_replay", "math500", "difference")]  # stated as (GRPO on 2H) - (matched replay) = +2.8
    d = paired_difference(SCORES["student_rl"], SCORES["matched_replay"])
    assert (ln["of"], ln["minus"]) == ("student_rl", "matched_replay") and ln["diff"] == pytest.approx(
        100 * d.mean - 2.8)
    md, _ = write_report(tmp_path / "run", tmp_path / "out")
    assert "| 3 | RL'd teacher -> dense bridge (FKL warmup -> OPD) | opd_all (1H+2H) | MATH-500 (paper: MATH) | " \
           f"75.0 ± {100 * _ev(SCORES['opd_all'])['math500']['stderr']:.1f} (k=16) | 79.3 (v4 abstract) | -4.3 |" in md
    assert "arXiv 2605.12483" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["paper"]["lines"][0]["row"] == \
        "t2_grpo_qwen3_1.7b"


def test_a_figure_for_other_models_is_shown_but_not_subtracted(tmp_path):
    """A 14B-teacher run beside the paper's 8B-teacher figure: the figure is there, the difference is not."""
    data = collect(paper_run(tmp_path / "run", teacher="Qwen3-14B"))
    by = {(ln["row"], ln["set"], ln["what"]): ln for ln in data["paper"]["lines"]}
    ln = by[("t3_rl_bridge", "math500", "value")]
    assert ln["paper"] == 79.3 and ln["diff"] is None and "not this run's models" in ln["paper_text"]
    assert by[("t3_direct_grpo", "math500", "value")]["diff"] is not None  # the student's figure still applies
    assert by[("t2_grpo_qwen3_14b", "math500", "value")]["route"].startswith("teacher_rl_all")


@pytest.mark.parametrize("toy_by", ["set_name", "plan"])
def test_a_toy_run_is_not_comparable(tmp_path, toy_by):
    layout = paper_run(tmp_path / "run", sets={"toy-test": "toy-test"} if toy_by == "set_name" else None,
                       toy_world=toy_by == "plan")
    data = collect(layout)
    assert data["paper"] is None
    md, _ = write_report(layout.root, tmp_path / "out")
    assert "Not comparable to the paper's figures (toy world)." in md
    assert "Beside the paper" not in md and "| paper row |" not in md


def test_other_data_gets_no_paper_section(tmp_path):
    layout = paper_run(tmp_path / "run", sets={"gsm8k": "/data/gsm8k.jsonl"})
    md, _ = write_report(layout.root, tmp_path / "out")
    assert collect(layout)["paper"] is None and "paper" not in md.lower()


def test_every_figure_names_its_source_and_a_row():
    fig = paper.figures()
    assert fig["source"]["arxiv"] == "2605.12483"
    ids = [r["id"] for r in fig["rows"]]
    assert len(ids) == len(set(ids))
    for row in fig["rows"]:
        for f in row["figures"]:
            assert f["version"] in fig["source"]["versions"] and f["set"] in fig["eval_sets"]
            assert ("value" in f) != ("difference" in f)
            if "difference" in f:
                assert {f["of"], f["minus"]} <= set(ids) and row["id"] in (f["of"], f["minus"])
    assert fig["eval_sets"]["math500"]["label"] == "MATH-500"


def test_the_figures_ship_in_the_wheel(tmp_path):
    """Built from this tree and unpacked as an installer would, the package loads its figures with
    importlib.resources (a missing package-data glob leaves the file out of the wheel)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("megatron_s2d", "checkpoints_convert"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).extractall(site)
    code = ("from megatron_s2d.run import paper; import json; "
            "print(json.dumps([paper.__file__, paper.figures()['source']['arxiv']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    where, arxiv = json.loads(out.stdout.strip().splitlines()[-1])
    assert where.startswith(str(site)) and arxiv == "2605.12483"
