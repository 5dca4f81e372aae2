"""Errors that used to surface late, under internal names, are refused when the plan is loaded (or by the launcher's
first check, before a toy world is built or a base model imported), naming the plan field:

* a prompt + response budget past a model's context (it failed at step 0 inside the job, on SLURM after the queue);
* a data source that does not exist or does not parse (found after the base models were imported);
* stage names that are not safe folder names and override keys (``../../x`` wrote outside the run folder).
"""

import copy
import json
from pathlib import Path

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.config.validate import context_errors
from megatron_s2d.errors import S2DError
from megatron_s2d.run.preflight import check_inputs, model_contexts
from tests.unit.config.test_plan_config import BASE, _write

ROOT = Path(__file__).resolve().parents[3]
TOY = ROOT / "run_configs" / "toy_cpu.yaml"
QWEN = ROOT / "run_configs" / "qwen3_8b_to_1.7b.yaml"


# ------------------------------------------------------------------------------------------- stage names
@pytest.mark.parametrize("name", ["../../x", "opd.v2", "2nd_rl", "a b", "x/y", "", "_x"])
def test_unsafe_stage_names_are_refused_naming_the_stage_and_the_rule(tmp_path, name):
    d = copy.deepcopy(BASE)
    d["stages"][3]["name"] = name
    with pytest.raises(S2DError) as e:
        load_plan(_write(tmp_path, d))
    msg = str(e.value)
    assert "stages[3].name" in msg
    if name:
        assert repr(name) in msg and "[A-Za-z][A-Za-z0-9_]*" in msg and "RUN/stages/<name>/" in msg


def test_the_refusal_suggests_a_safe_name(tmp_path):
    d = copy.deepcopy(BASE)
    d["stages"][2]["name"] = "opd.v2"
    d["stages"][3]["init"] = "opd.v2"
    with pytest.raises(S2DError, match=r"e\.g\. 'opd_v2'"):
        load_plan(_write(tmp_path, d))
    d["stages"][2]["name"] = d["stages"][3]["init"] = "opd_v2"
    assert [s.name for s in load_plan(_write(tmp_path, d)).stages][2] == "opd_v2"


@pytest.mark.parametrize("name", ["base", "base_eval", "report"])
def test_reserved_stage_names_are_refused(tmp_path, name):
    d = copy.deepcopy(BASE)
    d["stages"][3]["name"] = name
    with pytest.raises(S2DError, match=rf"stages\[3\]\.name = '{name}' is reserved"):
        load_plan(_write(tmp_path, d))


# ------------------------------------------------------------------------------------------- token budgets
def test_rollout_budget_past_the_context_names_the_stage_field_and_each_model(tmp_path):
    plan = load_plan(TOY, [f"run_dir={tmp_path}", "stages.opd.rollout.max_new_tokens=200"])
    assert model_contexts(plan) == {"teacher": 256, "student": 256}  # the toy world's, before it is built
    with pytest.raises(S2DError) as e:
        check_inputs(plan)
    msg = str(e.value)
    # opd: the student generates, the teacher scores: both must hold 128 + 200 tokens
    for role in ("student", "teacher"):
        assert (f"stages.opd.rollout.max_new_tokens = 200 + data.max_prompt_tokens = 128 is 328 tokens, past the "
                f"context of models.{role} (max_position_embeddings = 256)") in msg
    assert "lower stages.opd.rollout.max_new_tokens to <= 128" in msg
    assert "teacher_rl" not in msg and not (tmp_path / "toy_world").exists()  # nothing was built


def test_eval_budget_counts_only_the_models_evaluated():
    plan = load_plan(TOY, ["eval.max_new_tokens=200"])
    errors = context_errors(plan, {"teacher": 256, "student": 256})
    assert len(errors) == 2 and all(e.startswith("eval.max_new_tokens = 200 + data.max_prompt_tokens") for e in errors)
    # the student's final policies are evaluated, the teacher only as a base model
    no_base = load_plan(TOY, ["eval.max_new_tokens=200", "eval.include_base=false",
                              "stages.teacher_rl.eval=false"])
    assert context_errors(no_base, {"teacher": 256, "student": 256}) == [
        e for e in errors if "models.student" in e]
    assert context_errors(no_base, {"teacher": 256, "student": 512}) == []


def test_prompt_budget_is_part_of_it():
    plan = load_plan(TOY, ["data.max_prompt_tokens=200"])  # 200 + 64 > 256
    assert any("data.max_prompt_tokens = 200 is 264 tokens" in e for e in context_errors(plan, model_contexts(plan)))
    with pytest.raises(S2DError, match=r"data.max_prompt_tokens = 0 must be >= 1"):
        load_plan(TOY, ["data.max_prompt_tokens=0"])


def test_recipe_contexts_come_from_the_models_config(tmp_path):
    """A real model's context is read from its HF config.json (here a copy of Qwen3-1.7B's, 40960 positions)."""
    plan = load_plan(QWEN, [f"run_dir={tmp_path}"])
    assert context_errors(plan, {"teacher": 40960, "student": 40960}) == []  # 1024 + 8192 fits
    src = ROOT / "megatron_s2d" / "models" / "hf_configs" / "Qwen3-1.7B" / "config.json"
    for role in ("teacher", "student"):
        (tmp_path / role).mkdir()
        cfg = json.loads(src.read_text())
        cfg["max_position_embeddings"] = 4096 if role == "student" else cfg["max_position_embeddings"]
        (tmp_path / role / "config.json").write_text(json.dumps(cfg))
    plan = load_plan(QWEN, [f"run_dir={tmp_path / 'run'}", f"models.teacher.hf={tmp_path / 'teacher'}",
                            f"models.student.hf={tmp_path / 'student'}", "models.teacher.tp=1", "models.student.tp=1"])
    assert model_contexts(plan) == {"teacher": 40960, "student": 4096}
    with pytest.raises(S2DError, match=r"stages.student_rl.rollout.max_new_tokens = 8192 \+ data.max_prompt_tokens = "
                                       r"1024 is 9216 tokens, past the context of models.student"):
        check_inputs(plan)


# ------------------------------------------------------------------------------------------- data sources
def _rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_missing_pool_is_named_before_anything_is_built(tmp_path):
    plan = load_plan(TOY, [f"run_dir={tmp_path}", f"data.pool={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(S2DError, match=rf"data.pool = '{tmp_path}/nope.jsonl': neither a registered dataset .* nor "
                                       r"an existing file or directory"):
        check_inputs(plan)
    assert not (tmp_path / "toy_world").exists() and not (tmp_path / "models").exists()


def test_eval_source_of_another_schema_is_named_with_its_index(tmp_path):
    good = _rows(tmp_path / "good.jsonl", [{"id": "a", "prompt": "1+1?", "answer": "2"}])
    odd = _rows(tmp_path / "odd.jsonl", [{"question": "1+1?", "gold": "2"}])
    plan = load_plan(TOY, [f"data.eval=[{{name: a, source: {good}}}, {{name: b, source: {odd}}}]"])
    with pytest.raises(S2DError) as e:
        check_inputs(plan)
    msg = str(e.value)
    assert f"data.eval[1].source = '{odd}': {odd}: cannot detect the schema from columns ['gold', 'question']" in msg
    assert "data.eval[0]" not in msg


def test_first_rows_must_hold_a_usable_problem(tmp_path):
    bad = _rows(tmp_path / "bad.jsonl", ["{not json", {"id": "a", "prompt": "", "answer": "2"}])
    plan = load_plan(TOY, [f"data.pool={bad}"])
    with pytest.raises(S2DError, match=rf"data.pool = '{bad}': {bad}: none of its first 2 rows is a usable problem "
                                       rf"\(schema 's2d'\): {bad}:1: invalid JSON.*; {bad}:2: empty 'prompt'"):
        check_inputs(plan)
    # one good row among bad ones loads (the bad ones are skipped and reported when the data is loaded)
    _rows(bad, ["{not json", {"id": "a", "prompt": "1+1?", "answer": "2"}])
    check_inputs(plan)


def test_empty_and_unsupported_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(S2DError, match=rf"data.pool = '{empty}': {empty}: no rows"):
        check_inputs(load_plan(TOY, [f"data.pool={empty}"]))
    csv = tmp_path / "pool.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(S2DError, match=r"data.pool = .*pool.csv.*unsupported file type '.csv'"):
        check_inputs(load_plan(TOY, [f"data.pool={csv}"]))


def test_folders_parquet_and_registered_names_pass(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pool"
    folder.mkdir()
    pq.write_table(pa.table({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"]}), folder / "a.parquet")
    _rows(folder / "b.jsonl", [{"problem": "3+3?", "answer": "6"}])
    check_inputs(load_plan(TOY, [f"data.pool={folder}", "data.eval=[{name: m, source: math500}]"]))
    _rows(folder / "c.jsonl", [{"id": "x", "prompt": "3+3?", "answer": "6"}])  # another schema in the same folder
    with pytest.raises(S2DError, match=r"data.pool = .*c.jsonl: schema 's2d' differs from 'aime'"):
        check_inputs(load_plan(TOY, [f"data.pool={folder}"]))
