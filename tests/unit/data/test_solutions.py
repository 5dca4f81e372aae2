"""Reference solutions (``Problem.solution``, what ``teacher_sft`` with ``sft.source: solutions`` trains on): kept by
the loaders where a schema has them, carried through the splits on disk without moving any split, and a pool
without them refused before anything runs (``solution_errors``), naming the source."""

import json

from megatron_s2d.data import Problem, load_problems, split_fractions
from megatron_s2d.data.sources import solution_errors
from megatron_s2d.data.split_store import read_split, write_splits

from s2d_data_rows import dapo_row, math500_row, math_row, write_jsonl


def test_loaders_keep_the_solution_where_the_schema_has_one(tmp_path):
    math = tmp_path / "math.jsonl"
    write_jsonl(math, [math_row("Compute $1 + 1$.", "Add: $\\boxed{2}$.")])
    assert load_problems(str(math)).problems[0].solution == "Add: $\\boxed{2}$."
    m500 = tmp_path / "m500.jsonl"
    write_jsonl(m500, [math500_row(0, "What is 2 + 2?", "4")])
    assert load_problems(str(m500)).problems[0].solution == "... so \\boxed{4}"
    dapo = tmp_path / "dapo.jsonl"
    write_jsonl(dapo, [dapo_row(0, "What is 3 + 3?", "6")])
    assert load_problems(str(dapo)).problems[0].solution is None
    s2d = tmp_path / "s2d.jsonl"
    write_jsonl(s2d, [{"id": "a", "prompt": "1 + 1?", "answer": "2", "source": "x", "solution": "1 + 1 = 2."},
                      {"id": "b", "prompt": "2 + 2?", "answer": "4", "source": "x", "solution": "  "},
                      {"id": "c", "prompt": "3 + 3?", "answer": "6", "source": "x"}])
    assert [p.solution for p in load_problems(str(s2d)).problems] == ["1 + 1 = 2.", None, None]


def test_rows_without_a_solution_are_written_as_before_and_splits_do_not_move(tmp_path):
    bare = Problem("a", "1 + 1?", "2", "x")
    solved = Problem("a", "1 + 1?", "2", "x", solution="1 + 1 = 2. The answer is \\boxed{2}.")
    assert bare.to_dict() == {"id": "a", "prompt": "1 + 1?", "answer": "2", "source": "x", "meta": {}}
    assert solved.to_dict()["solution"] == solved.solution
    assert bare == solved and bare.content_hash() == solved.content_hash()  # a label, not part of the identity
    problems = [Problem(f"p{i}", f"{i} + 1?", str(i + 1), "x", solution=f"{i} + 1 = {i + 1}.") for i in range(10)]
    splits = split_fractions(problems, {"1H": 0.5, "2H": 0.5}, seed=0)
    bare_splits = split_fractions([Problem(p.id, p.prompt, p.answer, p.source) for p in problems],
                                  {"1H": 0.5, "2H": 0.5}, seed=0)
    assert {n: s.manifest.content_hash for n, s in splits.items()} == \
        {n: s.manifest.content_hash for n, s in bare_splits.items()}
    write_splits(tmp_path, splits)
    back = read_split(tmp_path, "1H")
    assert [p.solution for p in back] == [p.solution for p in splits["1H"].problems] and back[0].solution


def test_a_pool_without_solutions_is_refused_naming_it(tmp_path):
    dapo = tmp_path / "dapo.jsonl"
    write_jsonl(dapo, [dapo_row(i, f"What is {i} + 3?", str(i + 3)) for i in range(3)])
    (err,) = solution_errors(str(dapo), ["teacher_sft"])
    assert err.startswith(f"data.pool = {str(dapo)!r} carries no reference solutions ({dapo}:1 has no 'solution')")
    assert "stages.teacher_sft (sft.source: solutions)" in err and "sft.source: rejection" in err
    (hub,) = solution_errors("dapo-math-17k", ["a", "b"])
    assert "BytedTsinghua-SIA/DAPO-Math-17k has no solution column" in hub and "stages.a, stages.b" in hub
    math = tmp_path / "math.jsonl"
    write_jsonl(math, [math_row("Compute $1 + 1$.", "$\\boxed{2}$")])
    assert solution_errors(str(math), ["teacher_sft"]) == []
    assert solution_errors("toy-train", ["teacher_sft"]) == [] and solution_errors("math", ["teacher_sft"]) == []
    assert solution_errors(str(dapo), []) == []  # no stage reads solutions: nothing to check
    assert solution_errors(str(tmp_path / "missing.jsonl"), ["teacher_sft"]) == []  # check_source reports it
    assert json.loads(dapo.read_text().splitlines()[0])  # the file was only read
