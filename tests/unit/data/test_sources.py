"""Loaders on small local files in the real hub schemas (jsonl and parquet); no network."""

import json

import pytest

from megatron_s2d.data import load_problems
from megatron_s2d.data.schemas import detect_schema
from megatron_s2d.data.sources import HUB_SOURCES
from megatron_s2d.errors import S2DError

from s2d_data_rows import aime_row, dapo_row, math500_row, math_row, write_jsonl, write_parquet


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_dapo_schema(tmp_path, dapo_rows, fmt):
    path = tmp_path / f"dapo.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, dapo_rows)
    res = load_problems(str(path))
    assert res.schema == "dapo" and res.n_loaded == 5 and res.n_skipped == 0
    p = res.problems[3]
    assert p.prompt == "What is 3 + 3?"  # DAPO's answer-format wrapper removed
    assert p.answer == "6" and p.id == "dapo/uuid-3" and p.source == "dapo"
    assert p.meta["dapo_wrapper_removed"] is True and p.meta["ability"] == "MATH"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_math_schema_takes_last_box_of_solution(tmp_path, fmt):
    rows = [
        math_row("Compute $1/2 + 1/4$.", "We get $\\boxed{\\frac{1}{2}}$ first, then \\boxed{\\frac{3}{4}}."),
        math_row("Find x.", "No final box in this solution."),
        math_row("Nested?", "Thus \\boxed{\\{1, 2\\}}."),
    ]
    path = tmp_path / f"math_test.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    res = load_problems(path, source="math")
    assert res.schema == "math"
    assert [p.answer for p in res.problems] == ["\\frac{3}{4}", "\\{1, 2\\}"]
    assert res.problems[0].meta == {"level": "Level 3", "type": "Algebra"}
    assert [(e.row, "\\boxed" in e.reason) for e in res.skipped] == [(2, True)]
    assert res.skipped[0].file == str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_math500_and_aime_schemas(tmp_path, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    m = load_problems(write(tmp_path / f"m500.{fmt}", [math500_row(i, f"Q{i}?", str(i)) for i in range(3)]))
    assert m.schema == "math500" and m.problems[1].id == "m500/test/algebra/1.json"
    assert m.problems[1].meta["level"] == 2
    a = load_problems(write(tmp_path / f"aime.{fmt}", [aime_row(i, f"AIME Q{i}", f"{100 + i}") for i in range(3)]))
    assert a.schema == "aime" and [p.id for p in a.problems] == ["aime/60", "aime/61", "aime/62"]
    assert a.problems[2].answer == "102" and a.problems[0].meta["year"] == "2024"


def test_integer_answers_and_missing_ids(tmp_path):
    rows = [{"problem": "AIME 2025 Q1", "answer": 70}, {"problem": "Q2", "answer": "588"}]
    res = load_problems(write_jsonl(tmp_path / "aime25.jsonl", rows), source="aime2025")
    assert [(p.id, p.answer) for p in res.problems] == [("aime2025/row1", "70"), ("aime2025/row2", "588")]


def test_own_schema_roundtrip(tmp_path):
    rows = [
        {"id": "t1", "prompt": "1+1?", "answer": "2", "source": "toy", "meta": {"difficulty": 1}},
        {"id": "t2", "prompt": "2+2?", "answer": "4"},
    ]
    res = load_problems(write_jsonl(tmp_path / "toy.jsonl", rows))
    assert res.schema == "s2d"
    assert [(p.id, p.source, p.meta) for p in res.problems] == [("t1", "toy", {"difficulty": 1}), ("t2", "toy", {})]
    again = load_problems(write_jsonl(tmp_path / "again.jsonl", [p.to_dict() for p in res.problems]))
    assert again.problems == res.problems


def test_malformed_rows_reported_with_file_and_line(tmp_path, dapo_rows):
    bad = [
        {**dapo_row(90, "Missing answer", "x"), "reward_model": {"style": "rule"}},
        {**dapo_row(91, "", "1")},
        {**dapo_row(92, "Q", "1"), "prompt": "not a list"},
        {**dapo_row(93, "Q", "1"), "reward_model": {"ground_truth": ["1"], "style": "rule"}},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", dapo_rows[:2] + bad, raw_lines=["", "{not json", "[1, 2]"])
    res = load_problems(path)
    assert res.n_loaded == 2 and res.n_rows == 2 + 4 + 2
    reasons = {e.row: e.reason for e in res.skipped}
    assert sorted(reasons) == [3, 4, 5, 6, 8, 9]  # line 7 is blank: not a row
    assert "ground_truth" in reasons[3] and "empty" in reasons[4] and "list of chat messages" in reasons[5]
    assert "string or an integer" in reasons[6] and "invalid JSON" in reasons[8] and "object" in reasons[9]
    assert all(e.file == str(path) for e in res.skipped)
    assert "2 problems from 8 rows, 6 skipped" in res.summary()
    with pytest.raises(S2DError, match=r"d\.jsonl:3: .*ground_truth"):
        load_problems(path, strict=True)


def test_parquet_wrong_types_reported(tmp_path):
    rows = [{"id": "a", "prompt": "Q1", "answer": "1"}, {"id": "b", "prompt": None, "answer": "2"},
            {"id": "c", "prompt": "Q3", "answer": None}]
    res = load_problems(write_parquet(tmp_path / "p.parquet", rows))
    assert [p.id for p in res.problems] == ["a"]
    assert [(e.row, e.reason) for e in res.skipped] == [(2, "missing 'prompt'"), (3, "missing 'answer'")]


def test_limit_directory_and_explicit_schema(tmp_path, dapo_rows):
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", dapo_rows[:3])
    write_parquet(d / "b.parquet", dapo_rows[3:])
    res = load_problems(d)
    assert res.n_loaded == 5 and len(res.files) == 2
    assert load_problems(d, limit=4).n_loaded == 4
    forced = load_problems(write_jsonl(tmp_path / "x.jsonl", [{"problem": "Q", "answer": "1", "id": 5}]),
                           schema="aime")
    assert forced.problems[0].id == "x/5"


def test_clear_errors(tmp_path):
    with pytest.raises(S2DError, match="neither a registered dataset"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(S2DError, match="cannot detect the schema"):
        load_problems(write_jsonl(tmp_path / "q.jsonl", [{"question": "Q", "label": "1"}]))
    with pytest.raises(S2DError, match="split= applies to hub"):
        load_problems(write_jsonl(tmp_path / "ok.jsonl", [{"id": "1", "prompt": "Q", "answer": "1"}]), split="test")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(S2DError, match="must hold a list"):
        load_problems(tmp_path / "bad.json")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(S2DError, match="not a readable parquet"):
        load_problems(tmp_path / "bad.parquet")
    with pytest.raises(S2DError, match="unknown schema"):
        load_problems(tmp_path / "bad.json", schema="csv")


def test_registry_names_and_detection():
    assert HUB_SOURCES["dapo-math-17k"].hub_id == "BytedTsinghua-SIA/DAPO-Math-17k"
    assert len(HUB_SOURCES["math"].configs) == 7 and HUB_SOURCES["math"].default_split == "test"
    assert detect_schema(["problem", "solution", "answer", "subject", "level", "unique_id"], "x") == "math500"
    assert detect_schema(["id", "problem", "solution", "answer", "url", "year"], "x") == "aime"
    assert detect_schema(["problem", "level", "type", "solution"], "x") == "math"


def test_hub_loader_goes_through_datasets(monkeypatch):
    """The hub path calls datasets.load_dataset per config and converts rows (stubbed: no network in tests)."""
    import datasets

    calls = []

    def fake_load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [math_row(f"{config} question", "so \\boxed{7}")]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    res = load_problems("math")
    assert [c[1] for c in calls] == list(HUB_SOURCES["math"].configs) and calls[0][2] == "test"
    assert res.n_loaded == 7 and res.problems[0].id == "math/algebra/1"
    assert res.skipped == [] and res.files[0] == "hf://EleutherAI/hendrycks_math/algebra[test]"
    assert load_problems("math", limit=2).n_loaded == 2
