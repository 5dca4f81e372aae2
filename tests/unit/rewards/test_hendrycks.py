"""lm-eval's Hendrycks MATH grader (``rewards.hendrycks``), against cases written from its definition
(lm-evaluation-harness ``lm_eval/tasks/hendrycks_math/utils.py``): last-box extraction (nested braces, ``\\fbox``,
``\\boxed `` with a space, unbalanced boxes), each normalisation rule of ``strip_string`` in turn, the raw-string
fallback where the reference raises, and answers it does not equate. Then the batch path (``grader=``)."""

import time

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.rewards import GRADERS, score_batch_with_stats
from megatron_s2d.rewards.hendrycks import (hendrycks_grade, is_equiv, last_boxed_only_string, remove_boxed,
                                            strip_string)

# (response, the box lm-eval's last_boxed_only_string returns)
BOXES = [
    ("so \\boxed{5}.", "\\boxed{5}"),
    ("first \\boxed{3}, then \\boxed{5}", "\\boxed{5}"),  # the last one
    ("\\boxed{\\frac{1}{\\sqrt{2}}} done", "\\boxed{\\frac{1}{\\sqrt{2}}}"),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\boxed{\\{1,2\\}}"),  # escaped braces count as braces (balanced here)
    ("the answer \\fbox{7} is boxed", "\\fbox{7}"),  # \fbox when there is no \boxed
    ("\\fbox{7} and \\boxed{8}", "\\boxed{8}"),  # \boxed is looked for first, wherever \fbox is
    ("$\\boxed 5$ yes", "\\boxed 5"),  # "\boxed " with a space: up to the next $
    ("\\boxed 5$ then \\boxed{6}", "\\boxed 5"),  # ... even when a braced box comes later
    ("I think it is \\boxed{4", None),  # unbalanced: no answer, no fall back to an earlier box
    ("\\boxed{3} and \\boxed{4", None),
    ("The answer is 4.", None),
]


@pytest.mark.parametrize("response, box", BOXES)
def test_last_boxed_only_string(response, box):
    assert last_boxed_only_string(response) == box


@pytest.mark.parametrize("box, content", [
    ("\\boxed{5}", "5"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed 5", "5"), ("\\fbox{7}", "7"),
    ("\\boxed\n{3}", None),  # the reference asserts a "\boxed{" prefix
])
def test_remove_boxed(box, content):
    assert remove_boxed(box) == content


# (raw answer, strip_string of it): one rule per row, in the reference's order
NORMALISED = [
    ("1\n2", "12"),  # linebreaks
    ("10\\!000", "10000"),  # inverse spaces
    ("\\\\frac{1}{2}", "\\frac{1}{2}"),  # \\ -> \
    ("\\tfrac{1}{2}", "\\frac{1}{2}"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),  # \left / \right
    ("90^{\\circ}", "90"), ("90^\\circ", "90"),  # degrees
    ("\\$5", "5"),  # dollars
    ("10 \\text{ cm}", "10"),  # a unit: "\text{ " and what follows
    ("50\\%", "50"),  # percentage
    ("x = .5", "\\frac{1}{2}"),  # " ." -> " 0.", then x= dropped, then 0.5 -> 1/2
    ("{.25}", "{0.25}"),  # "{." -> "{0."
    (".25", "0.25"),  # a leading "."
    ("k = 3", "3"), ("xy=3", "3"),  # a left side of at most two characters
    ("abc = 3", "abc=3"),  # a longer left side stays
    ("x=1=2", "x=1=2"),  # two "=": stays
    ("2\\sqrt2", "2\\sqrt{2}"),  # fix sqrt (one character)
    ("\\sqrt{23}", "\\sqrt{23}"),
    ("1 000", "1000"),  # spaces
    ("\\frac12", "\\frac{1}{2}"), ("\\frac1{72}", "\\frac{1}{72}"), ("\\fracab", "\\frac{a}{b}"),  # fix fracs
    ("\\frac{72}1", "\\frac{72}1"),  # not fixed (as documented upstream)
    ("\\frac1", "\\frac1"),  # one character after \frac: the whole string stays
    ("0.5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"), ("-3/4", "\\frac{-3}{4}"),  # a/b of integers
    ("03/4", "03/4"), ("+3/4", "+3/4"),  # not written canonically: stays
    ("1/2/3", "1/2/3"),  # two slashes: stays
    ("", ""),
]


@pytest.mark.parametrize("raw, stripped", NORMALISED)
def test_strip_string(raw, stripped):
    assert strip_string(raw) == stripped


# (a, b, equivalent) for is_equiv
EQUIV = [
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("0.5", "\\frac{1}{2}", True),
    (".5", "1/2", True),
    ("x = 3", "3", True),
    ("90^\\circ", "90", True),
    ("10\\%", "10", True),
    ("\\left[1, 2\\right)", "[1,2)", True),
    ("5 \\text{ apples}", "5", True),
    # the reference raises inside strip_string: raw strings are compared
    ("x/y", "\\frac{x}{y}", False),  # one "/" between non-integers
    ("x/y", "x/y", True),
    ("\\sqrt", "\\sqrt", True), ("2\\sqrt", "2 \\sqrt", False),  # \sqrt with nothing after it
    ("\\frac", "\\frac", True),
    ("1 \\text{ m} 2 \\text{ s}", "1", False),  # two units
    # not equivalent: no arithmetic, no reordering, no set semantics
    ("0.75", "\\frac{3}{4}", False),
    ("042", "42", False),
    ("2, 1", "1, 2", False),
    ("\\sqrt{8}", "2\\sqrt{2}", False),
    ("3.0", "3", False),
    ("1,000", "1000", False),
    ("\\pi", "3.14", False),
    (None, "3", False),
]


@pytest.mark.parametrize("a, b, equiv", EQUIV)
def test_is_equiv(a, b, equiv):
    assert is_equiv(a, b) is equiv
    assert is_equiv(b, a) is equiv


@pytest.mark.parametrize("response, gold, expected", [
    ("so the area is \\boxed{\\dfrac12}.", "\\frac{1}{2}", (1.0, "correct")),
    ("\\boxed{4}", "5", (0.0, "wrong")),
    ("The answer is 4.", "4", (0.0, "no_answer")),  # no box: no answer (lm-eval's last-box grader has no fallback)
    ("\\boxed{4", "4", (0.0, "no_answer")),
    ("\\fbox{4}", "4", (1.0, "correct")),
])
def test_hendrycks_grade(response, gold, expected):
    assert hendrycks_grade(response, gold) == expected


def test_batch_path_grades_in_process_with_outcomes():
    """``grader="hendrycks_boxed"``: scores and outcomes per response, no worker started, a boxed gold unwrapped."""
    from megatron_s2d.rewards.pool import get_pool

    started = get_pool().n_started
    res = score_batch_with_stats(["\\boxed{0.5}", "The answer is 5", "", None, "\\boxed{6}"],
                                 ["\\frac{1}{2}", "5", "1", "1", "\\boxed{6}"], grader="hendrycks_boxed")
    assert res.scores == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert res.outcomes == ["correct", "no_answer", "no_answer", "no_answer", "correct"]
    assert res.stats.n_correct == 2 and res.stats.n_worker == 0
    assert get_pool().n_started == started


def test_unknown_grader_is_refused():
    with pytest.raises(S2DError, match="grader = 'sympy' is not one of"):
        score_batch_with_stats(["\\boxed{1}"], ["1"], grader="sympy")


def test_graders_match_the_plan_schema():
    import typing

    from megatron_s2d.config.schema import PlanConfig

    hints = typing.get_type_hints(PlanConfig)
    assert typing.get_args(hints["grader"]) == GRADERS


def test_adversarial_responses_are_cheap():
    """In process is safe: 1-MB responses built to stress each step (the brace scan of a huge last box after many
    unclosed ones, ``\\frac`` / ``\\sqrt`` fixing over the whole answer, the ``\\boxed `` split) grade in well
    under a second each."""
    many_open = "\\boxed{" * 30_000
    nasty = [
        many_open + "\\boxed{" + "{" * 200_000 + "x" * 500_000 + "}" * 200_001,  # the scan
        many_open + "\\boxed{" + "\\frac12" * 130_000 + "}",  # fix_fracs on every part
        many_open + "\\boxed{" + "\\sqrt2" * 150_000 + "}",  # fix_sqrt on every part
        "\\boxed " * 120_000 + "1" * 100_000,  # the "\\boxed " split
    ]
    for response in nasty:
        assert len(response) > 900_000
        t0 = time.perf_counter()
        score, outcome = hendrycks_grade(response, "1")
        assert time.perf_counter() - t0 < 1.0
        assert (score, outcome) == (0.0, "wrong")
