"""Toy problem generator: determinism, shipped files == generator output, correctness, disjointness."""

import json
import re

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.toy import problems as P


def _eval(expr: str) -> int:
    assert re.fullmatch(r"[0-9 +\-*()]+", expr), expr  # digits and operators only, safe to evaluate
    return eval(expr)  # noqa: S307


def test_generate_is_deterministic_and_seed_dependent():
    a = P.generate(60, seed=3, split="x")
    assert a == P.generate(60, seed=3, split="x")
    assert [p.meta for p in a] == [p.meta for p in P.generate(60, seed=3, split="x")]
    assert [p.prompt for p in a] != [p.prompt for p in P.generate(60, seed=4, split="x")]


def test_shipped_files_equal_generator_output(tmp_path):
    paths = P.write_shipped(tmp_path)
    for split, n in P.SHIPPED_SIZES.items():
        assert paths[split].read_bytes() == P.shipped_path(split).read_bytes(), (
            f"{P.shipped_path(split)} drifted from the generator; run `python -m megatron_s2d.toy.problems`")
        loaded = P.load_shipped(split)
        assert len(loaded) == n
        assert loaded == P.generate_splits()[split]


def test_rows_use_project_schema():
    row = json.loads(P.shipped_path("test").read_text().splitlines()[0])
    assert set(row) == {"id", "prompt", "answer", "source", "meta", "solution"}
    assert row["source"] == P.SOURCE and row["meta"]["level"] in P.LEVELS


def test_every_shipped_row_carries_its_worked_solution():
    """teacher_sft (sft.source: solutions) trains on the rows' `solution`: the worked response the toy models are
    pre-trained on, ending in the row's own answer; the s2d loader keeps it."""
    from megatron_s2d.data.sources import load_problems

    for split in P.SHIPPED_SIZES:
        loaded = load_problems(f"toy-{split}").problems
        assert len(loaded) == P.SHIPPED_SIZES[split]
        for p in loaded:
            steps, tail = p.solution.split(". The answer is ")
            assert tail == f"\\boxed{{{p.answer}}}.", p
            for step in steps.split(". "):  # "a op b = c", each one right, the last one the answer
                lhs, rhs = step.split(" = ")
                assert eval(lhs) == int(rhs), p  # noqa: S307 (digits and + - * only)
            assert rhs == p.answer


def test_adding_solutions_keeps_the_shipped_world_and_its_config_hash():
    """The build reads prompts, answers and levels: its data digest is of the rows without `solution`, which is the
    digest of the files as shipped before they carried one, so the shipped world (and `python -m
    megatron_s2d.toy.build`'s cache key) is unchanged."""
    import hashlib

    from megatron_s2d.toy import build as B

    for split in P.SHIPPED_SIZES:
        rows = [json.loads(line) for line in P.shipped_path(split).read_text().splitlines()]
        bare = "".join(json.dumps({k: v for k, v in r.items() if k != "solution"}, ensure_ascii=False) + "\n"
                       for r in rows)
        assert B._data_digest(P.shipped_path(split)) == hashlib.sha256(bare.encode()).hexdigest()
    assert B._data_digest(P.shipped_path("train")) == \
        "53b83dc21ae1d9287217c960a273c3d3cc3fc5955e593eea74fd969299733b04"  # the file as shipped before solutions
    assert B.shipped_world(0)[0] is not None


def test_answers_levels_and_solutions_are_correct():
    splits = P.generate_splits()
    for split, items in splits.items():
        counts = {lv: sum(p.meta["level"] == lv for p in items) for lv in P.LEVELS}
        assert counts == {lv: P.SHIPPED_SIZES[split] // 5 for lv in P.LEVELS}
        for p in items:
            assert p.answer == str(_eval(P.expression_of(p.prompt))), p
            assert int(p.answer) >= 0


@pytest.mark.parametrize("level", P.LEVELS)
def test_worked_steps_are_arithmetic_truths(level):
    import random

    rng = random.Random(level)
    for _ in range(200):
        item = P.sample_item(rng, level)
        text = P.solution_text(item)
        assert text.endswith(f"The answer is \\boxed{{{item.answer}}}.")
        for step in item.steps:
            lhs, rhs = step.split(" = ")
            assert _eval(lhs) == int(rhs), step
        assert _eval(item.expr) == item.answer
        assert P.solution_text(item, hedged=True) == text[:-2] + " \\pm 1}."


def test_splits_and_pretraining_text_are_disjoint_by_content():
    splits = P.generate_splits()
    train_keys, test_keys = P.keys_of(splits["train"]), P.keys_of(splits["test"])
    assert not train_keys & test_keys
    assert len({P.expression_of(p.prompt) for p in splits["train"]}) == len(splits["train"])
    items = P.pretrain_items(3000, seed=0, exclude=train_keys | test_keys, level_weights=[1] * 5)
    for item in items:
        assert not P.content_keys(item.expr) & (train_keys | test_keys)


def test_content_keys_treat_commutative_forms_as_equal():
    assert P.content_keys("3 + 4") == P.content_keys("4 + 3") == {"3+4", "4+3"}
    assert P.content_keys("7 * 5") == {"7*5", "5*7"}
    assert P.content_keys("9 - 2") == {"9-2"}
    assert P.content_keys("1 + 2 * 3") == {"1+2*3"}


def test_bad_inputs_raise_named_errors(tmp_path):
    with pytest.raises(S2DError, match="level"):
        P.sample_item(__import__("random").Random(0), 9)
    with pytest.raises(S2DError, match="not a toy-arith prompt"):
        P.expression_of("Tell me a joke.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "What is 1 + 2?", "answer": "3", "source": "s", "meta": {"level": 1}}\n'
                   '{"id": "b", "prompt": "What is 1 + 3?", "source": "s", "meta": {"level": 1}}\n')
    with pytest.raises(S2DError, match=r"bad.jsonl:2: .*answer"):
        P.read_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(S2DError, match=r"bad.jsonl:1: invalid JSON"):
        P.read_jsonl(bad)
    with pytest.raises(S2DError, match="split"):
        P.shipped_path("validation")
