"""Answer extraction and pre-checks (pure, in-process)."""

import pytest

from megatron_s2d.rewards.extract import (
    MAX_ANSWER_CHARS,
    RESPONSE_TAIL_CHARS,
    extract_answer,
    all_boxed,
    precheck_response,
    gold_answer_text,
    last_boxed,
    precheck_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the group
        ("\\boxed{a \\boxed{b}}", "a \\boxed{b}"),  # last top-level box, not the nested one
        ("so \\boxed 5 is it", "5"),
        ("\\boxed {3}", "3"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == (True, expected)


def test_last_boxed_unbalanced_and_absent():
    assert last_boxed("\\boxed{1} and \\boxed{2") == (True, None)
    assert last_boxed("no box here") == (False, None)
    assert last_boxed("\\boxedx{3}") == (False, None)  # another command, not \boxed


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 42.", "42"),
        ("So the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Work...\nAnswer: 17", "17"),
        ("**Answer:** 12", "12"),
        ("x is \\(5\\)\nThe answer is: \\(9\\)", "9"),
        ("so we get 3 apples\nand then 5 and 7/8 left", "7/8"),
        ("steps 1 2 3\n\n  total -4.5  \n\n", "-4.5"),
        ("\\boxed{3} but the answer is 4", "3"),  # a box beats the text fallback
    ],
)
def test_extract_answer_rules(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response", [None, "", 42, "no numbers in the last line\nat all", "\\boxed{2", "\\boxed{}"])
def test_extract_answer_none(response):
    assert extract_answer(response) is None


def test_only_tail_is_searched():
    early_box = "\\boxed{1}" + "x" * (RESPONSE_TAIL_CHARS + 10)
    assert extract_answer(early_box) is None
    assert extract_answer("x" * 10**6 + " \\boxed{8}") == "8"


def test_fullwidth_digits_are_not_numbers():
    assert extract_answer("the total is ４２") is None


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("\\frac{1}{2}", True),
        ("2\\pi", True),
        ("π/2", True),
        ("x" * (MAX_ANSWER_CHARS + 1), False),
        ("\\frac{" * 30 + "1" + "}" * 30, False),
        ("４２", False),  # fullwidth digits
        ("х=3", False),  # Cyrillic x
        ("4\u200b2", False),  # zero-width space
    ],
)
def test_precheck(answer, ok):
    assert (precheck_answer(answer) is None) == ok


def test_gold_text():
    assert gold_answer_text(" $x=3$ ") == "x=3"
    assert gold_answer_text("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    # several boxes are a set: kept whole for math-verify to read together (not the last box alone)
    assert gold_answer_text(" \\boxed{1}\n\\boxed{2} ") == "\\boxed{1} \\boxed{2}"
    assert gold_answer_text("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)") == "\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)"


def test_precheck_response_looks_at_every_box():
    assert precheck_response("so \\boxed{3} and \\boxed{5}") is None
    assert precheck_response("first \\boxed{\u0417} then \\boxed{5}") is not None  # Cyrillic Ze in an earlier box
    assert precheck_response("$" + "{" * 30 + "1" + "}" * 30 + "$") is not None  # nesting outside any box
    assert all_boxed("\\boxed{1} \\fbox{2} \\boxed{3") == ["1", "2"]


def test_number_fallback_ignores_walls_of_text():
    assert extract_answer("1+" * 1000 + "1}") is None
    assert extract_answer("lots of text\n" + "1+" * 100 + "1") == "1"
