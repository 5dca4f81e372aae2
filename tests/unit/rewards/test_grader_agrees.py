"""The reward grades like math-verify: a table of (gold, response, expected) over the answer forms models write, each
row checked against our reward AND against math-verify's own parse + verify run here in-process with the same
extraction configs. Before the reward let math-verify extract, it disagreed on the rows marked ``# was ...``
(checked by running the previous extractor on this table).
Also: where lm-eval's Hendrycks last-box grader (the plan's other ``grader``) differs from math-verify on the same
table, listed row by row, and the agreement statistics of the two. And the reward works from a script that has no
``if __name__ == "__main__":`` guard."""

import subprocess
import sys

import pytest

from megatron_s2d.rewards import score_batch_with_stats, shutdown_pool
from megatron_s2d.rewards import pool as pool_mod

TABLE = [
    # (gold, response, expected)
    ("5", "Adding, we get \\boxed{5}.", 1.0),
    # math-verify reads every box of a response as one answer (a set): boxing an intermediate result costs the point
    ("5", "First \\boxed{3}, then correcting myself: \\boxed{5}.", 0.0),  # was 1 (we kept only the last box)
    ("3, 5", "So x = 3 or x = 5, giving \\boxed{3} and \\boxed{5}.", 1.0),  # was 0 (kept only the last box)
    ("5, 3", "The roots are \\boxed{3} and \\boxed{5}.", 1.0),  # was 0
    ("5", "Final Answer: The final answer is $5$. I hope it is correct.", 1.0),
    ("\\frac{1}{2}", "The probability is $\\frac{1}{2}$.", 1.0),  # was 0 (last LaTeX expression, no box)
    ("\\frac{1}{2}", "Therefore\n\\[ p = \\frac{1}{2} \\]", 1.0),  # was 0 (display math, no box)
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("0.75", "\\boxed{\\frac{3}{4}}", 1.0),
    ("(1, 2]", "The solution set is $x \\in (1, 2]$.", 1.0),  # was 0 (interval in text)
    ("(1,2]", "\\boxed{(1, 2]}", 1.0),
    ("(1,2]", "\\boxed{[1, 2]}", 0.0),
    ("[0,\\infty)", "\\boxed{[0, \\infty)}", 1.0),
    ("\\{1,2\\}", "\\boxed{\\{2, 1\\}}", 1.0),
    ("1, 2", "\\boxed{2, 1}", 1.0),  # multi-answer gold, other order
    ("x=1 \\text{ or } x=2", "\\boxed{2, 1}", 1.0),
    # a gold written as several boxes is a set for math-verify (we used to keep its last box only)
    ("\\boxed{1}\\boxed{2}", "\\boxed{1,2}", 1.0),  # was 0
    ("\\boxed{1}\\boxed{2}", "So \\boxed{2} and \\boxed{1}.", 1.0),  # was 0
    ("\\boxed{1}\\boxed{2}", "\\boxed{2}", 0.0),  # was 1 (the last box alone)
    ("\\boxed{2}, \\boxed{3}, \\boxed{5}", "The primes are \\boxed{2, 3, 5}.", 1.0),  # was 0
    ("\\boxed{2}, \\boxed{3}, \\boxed{5}", "\\boxed{5}", 0.0),  # was 1
    ("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)", "\\boxed{-2, 1}", 1.0),  # was 0
    ("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)", "\\boxed{1, 2}", 0.0),
    ("3", "\\boxed{x = 3}", 1.0),
    ("x=3", "\\boxed{3}", 1.0),
    ("50\\%", "\\boxed{50\\%}", 1.0),
    ("10", "\\boxed{10 \\text{ cm}}", 1.0),
    ("-7", "The answer is -7.", 1.0),
    ("-7", "\\boxed{7}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{3}}", 0.0),
    ("4", "\\boxed{5}", 0.0),
    ("4", "I think it is \\boxed{4", 0.0),  # a truncated box is no answer
    ("42", "\\boxed{042}", 1.0),
    ("42", "The answer is 41.", 0.0),
    ("(1,2)", "\\boxed{(2, 1)}", 0.0),  # an ordered pair is not a set
    ("12", "So the total is\n12", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "Thus $\\cos 30^\\circ = \\frac{\\sqrt{3}}{2}$.", 1.0),  # was 0
    ("4", "", 0.0),
    ("4", "I don't know.", 0.0),
]


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    pool_mod.get_pool().warm_up(2)
    yield
    shutdown_pool()


def _math_verify_itself(gold: str, response: str) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    g = parse("\\boxed{" + gold + "}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
    p = parse(response, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    return 1.0 if g and p and verify(g, p) else 0.0


def test_table_matches_expected_and_math_verify():
    golds, responses, expected = zip(*TABLE)
    got = score_batch_with_stats(list(responses), list(golds), timeout_s=5.0).scores
    wrong = [(g, r, e, s) for (g, r, e), s in zip(TABLE, got) if s != e]
    assert not wrong, f"(gold, response, expected, got): {wrong}"
    disagree = [(g, r) for (g, r, e) in TABLE if _math_verify_itself(g, r) != e]
    assert not disagree, f"rows where math-verify itself grades otherwise: {disagree}"


# Where lm-eval's Hendrycks last-box grader (``grader: hendrycks_boxed``) differs from math-verify on TABLE, by the
# row's (gold, response); every other row they grade alike. The value is the Hendrycks verdict.
HENDRYCKS_DIFFERS = {
    # it reads only the last box (math-verify: all boxes together, as a set)
    ("5", "First \\boxed{3}, then correcting myself: \\boxed{5}."): 1.0,
    ("3, 5", "So x = 3 or x = 5, giving \\boxed{3} and \\boxed{5}."): 0.0,
    ("5, 3", "The roots are \\boxed{3} and \\boxed{5}."): 0.0,
    ("\\boxed{1}\\boxed{2}", "So \\boxed{2} and \\boxed{1}."): 0.0,
    # no box, no answer (math-verify reads "final answer is $X$", the last LaTeX expression, the last number)
    ("5", "Final Answer: The final answer is $5$. I hope it is correct."): 0.0,
    ("\\frac{1}{2}", "The probability is $\\frac{1}{2}$."): 0.0,
    ("\\frac{1}{2}", "Therefore\n\\[ p = \\frac{1}{2} \\]"): 0.0,
    ("(1, 2]", "The solution set is $x \\in (1, 2]$."): 0.0,
    ("-7", "The answer is -7."): 0.0,
    ("12", "So the total is\n12"): 0.0,
    ("\\frac{\\sqrt{3}}{2}", "Thus $\\cos 30^\\circ = \\frac{\\sqrt{3}}{2}$."): 0.0,
    # strings, not values: no arithmetic, no reordering, no sets, no leading-zero or surd simplification
    ("0.75", "\\boxed{\\frac{3}{4}}"): 0.0,
    ("\\{1,2\\}", "\\boxed{\\{2, 1\\}}"): 0.0,
    ("1, 2", "\\boxed{2, 1}"): 0.0,
    ("x=1 \\text{ or } x=2", "\\boxed{2, 1}"): 0.0,
    ("\\boxed{1}\\boxed{2}", "\\boxed{1,2}"): 0.0,
    ("\\boxed{2}, \\boxed{3}, \\boxed{5}", "The primes are \\boxed{2, 3, 5}."): 0.0,
    ("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)", "\\boxed{-2, 1}"): 0.0,
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"): 0.0,
    ("42", "\\boxed{042}"): 0.0,
}


def test_hendrycks_agreement_with_math_verify_on_the_table():
    """Both graders over TABLE through the reward's batch path: they disagree exactly on HENDRYCKS_DIFFERS, and the
    agreement statistics ``s2d eval --grader both`` reports are the counts of that list."""
    from megatron_s2d.eval.metrics import grader_agreement

    golds, responses, expected = zip(*TABLE)
    mv = score_batch_with_stats(list(responses), list(golds), timeout_s=5.0).scores
    hb = score_batch_with_stats(list(responses), list(golds), grader="hendrycks_boxed").scores
    assert mv == list(expected)
    assert len(TABLE) >= 33 and set(HENDRYCKS_DIFFERS) <= {(g, r) for g, r, _ in TABLE}
    got = {(g, r): h for (g, r, _), h, m in zip(TABLE, hb, mv) if h != m}
    assert got == HENDRYCKS_DIFFERS
    agree = grader_agreement("math_verify", mv, "hendrycks_boxed", hb)
    only_hb = sum(1 for v in HENDRYCKS_DIFFERS.values() if v == 1.0)
    assert (agree.n_samples, agree.n_agree) == (len(TABLE), len(TABLE) - len(HENDRYCKS_DIFFERS))
    assert (agree.only_a, agree.only_b) == (len(HENDRYCKS_DIFFERS) - only_hb, only_hb)
    assert agree.rate == pytest.approx(1 - len(HENDRYCKS_DIFFERS) / len(TABLE))  # 20 of the 40 rows today


SCRIPT = """
from megatron_s2d.rewards import math_reward
print("score", math_reward("so \\\\boxed{\\\\frac{1}{2}}", "0.5", timeout_s=5.0))
"""


def test_reward_from_a_script_without_a_main_guard(tmp_path):
    """The workers never re-import the caller's __main__: a plain script (no guard) scores and exits cleanly."""
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "score 1.0" in proc.stdout
