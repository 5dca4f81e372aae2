"""Content-keyed splits: order independence, de-duplication, exact sizes, manifests."""

import random

import pytest

from megatron_s2d.data import Problem, SplitManifest, dedupe, split_fractions, split_halves, verify_split
from megatron_s2d.errors import S2DError


def _problems(n: int, source: str = "s") -> list[Problem]:
    return [Problem(f"{source}/{i}", f"What is {i} squared?", str(i * i), source) for i in range(n)]


def test_shuffled_input_gives_identical_splits_and_manifests():
    probs = _problems(101)
    a1, b1 = split_halves(probs, seed=3)
    shuffled = probs[:]
    random.Random(0).shuffle(shuffled)
    a2, b2 = split_halves(shuffled, seed=3)
    assert a1.problems == a2.problems and b1.problems == b2.problems
    assert a1.manifest == a2.manifest and b1.manifest.to_json() == b2.manifest.to_json()
    assert (len(a1), len(b1)) == (51, 50)  # odd count: the extra problem goes to the first half
    assert not {p.content_hash() for p in a1} & {p.content_hash() for p in b1}
    assert {p.id for p in a1} | {p.id for p in b1} == {p.id for p in probs}


def test_seed_changes_membership_but_not_parent():
    probs = _problems(200)
    a0, _ = split_halves(probs, seed=0)
    a1, _ = split_halves(probs, seed=1)
    assert {p.id for p in a0} != {p.id for p in a1}
    assert a0.manifest.parent_hash == a1.manifest.parent_hash


def test_duplicates_removed_and_counted():
    probs = _problems(10)
    dup_ws = Problem("z/dup", "  What is 3   squared? ", "9", "other")  # same content modulo whitespace
    res = dedupe(probs + [probs[2], dup_ws])
    assert len(res.problems) == 10 and res.duplicates_removed == 2
    kept = next(p for p in res.problems if p.answer == "9")
    assert kept.id == "s/3"  # the smallest id wins, whatever the input order
    parts = split_fractions([dup_ws] + probs[::-1], {"x": 0.5, "y": 0.5}, seed=0)
    assert parts["x"].manifest.duplicates_removed == 1 and parts["x"].manifest.parent_count == 10


def test_fractions_sizes_sources_and_json_roundtrip():
    probs = _problems(7, "dapo") + _problems(3, "math")
    probs = [Problem(p.id, p.prompt + f" ({p.source})", p.answer, p.source) for p in probs]
    parts = split_fractions(probs, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=11)
    assert [len(parts[k]) for k in "abc"] == [5, 3, 2]
    m = parts["b"].manifest
    assert sum(parts["b"].manifest.sources.values()) == 3 and m.fraction == 0.3 and m.seed == 11
    assert SplitManifest.from_json(m.to_json()) == m
    for s in parts.values():
        verify_split(s)
    all_members = [p.content_hash() for s in parts.values() for p in s]
    assert len(all_members) == len(set(all_members)) == 10


def test_largest_remainder_rounding():
    parts = split_fractions(_problems(10), {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, seed=0)
    assert [len(parts[k]) for k in "abc"] == [4, 3, 3]


def test_content_hash_ignores_id_source_and_whitespace_only():
    p = Problem("a", "Find  x.", "2", "s1")
    assert p.content_hash() == Problem("b", " Find x. ", "2", "s2", {"k": 1}).content_hash()
    assert p.content_hash() != Problem("a", "Find x.", "3", "s1").content_hash()


def test_verify_split_detects_tampering():
    a, _ = split_halves(_problems(6), seed=0)
    tampered = type(a)(a.name, a.problems[:-1] + (Problem("q", "other", "1", "s"),), a.manifest)
    with pytest.raises(S2DError, match="do not match the manifest"):
        verify_split(tampered)


@pytest.mark.parametrize(
    "fractions, match",
    [({"a": 0.5, "b": 0.4}, "sum to 1"), ({"a": 1.5}, r"\(0, 1\]"), ({}, "no splits"), ({"": 1.0}, "names")],
)
def test_bad_fractions(fractions, match):
    with pytest.raises(S2DError, match=match):
        split_fractions(_problems(4), fractions)


def test_bad_inputs():
    with pytest.raises(S2DError, match="item 1 is a dict"):
        split_halves([_problems(1)[0], {"id": 1}])
    with pytest.raises(S2DError, match="two distinct names"):
        split_halves(_problems(4), names=("x", "x"))
    with pytest.raises(S2DError, match="missing or unexpected"):
        SplitManifest.from_dict({"name": "a"})
    with pytest.raises(S2DError, match="Problem.answer is empty"):
        Problem("a", "q", " ", "s")
