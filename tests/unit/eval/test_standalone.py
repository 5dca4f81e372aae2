"""``s2d eval``'s argument checks, made before any model is loaded: ``--out`` and the response budget."""

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.eval.standalone import check_out, max_new_tokens


def test_out_must_be_a_writable_file_path(tmp_path):
    assert check_out(None) is None
    assert check_out(str(tmp_path / "eval.json")) == tmp_path / "eval.json"
    with pytest.raises(S2DError, match=rf"--out {tmp_path}: is a folder; give the path of a JSON file"):
        check_out(str(tmp_path))
    with pytest.raises(S2DError, match=rf"its folder {tmp_path}/missing does not exist: create it, or give another"):
        check_out(str(tmp_path / "missing" / "eval.json"))
    (tmp_path / "f").write_text("")
    with pytest.raises(S2DError, match=rf"its folder {tmp_path}/f is a file, not a folder"):
        check_out(str(tmp_path / "f" / "eval.json"))


def test_the_budget_is_what_the_context_leaves_after_the_longest_prompt():
    lens = {"math500": 300, "aime2024": 700}
    assert max_new_tokens(None, 4096, lens) == 4096 - 700
    assert max_new_tokens(1024, 4096, lens) == 1024
    with pytest.raises(S2DError, match=r"--max-new-tokens = 3397: the longest prompt \(700 tokens, in aime2024\) "
                                       r"leaves 3396 of the model's 4096-token context: use at most 3396"):
        max_new_tokens(3397, 4096, lens)
    with pytest.raises(S2DError, match=r"--data aime2024: its longest prompt \(700 tokens\) fills the model's "
                                       r"700-token context"):
        max_new_tokens(None, 700, lens)
    with pytest.raises(S2DError, match="must be >= 1"):
        max_new_tokens(0, 4096, lens)


def test_graders_and_the_table_with_both():
    """``--grader both``: math-verify scores avg@k, both graders get a row, and the agreement line follows."""
    from megatron_s2d.eval.runner import Evaluator, _compare_graders
    from megatron_s2d.eval.standalone import graders_of, results_table

    assert graders_of("both") == ("math_verify", "hendrycks_boxed")
    assert graders_of("hendrycks_boxed") == ("hendrycks_boxed",)
    # per grader: 2 problems x k=2 verdicts
    per = {"math_verify": [[1.0, 1.0], [0.0, 1.0]], "hendrycks_boxed": [[1.0, 0.0], [0.0, 0.0]]}
    both = _compare_graders(per)
    assert both["by_grader"]["math_verify"]["avg"] == 0.75 and both["by_grader"]["hendrycks_boxed"]["avg"] == 0.25
    assert both["agreement"]["correct_only_by"] == {"math_verify": 2, "hendrycks_boxed": 0}
    results = {"math500": {"avg": 0.75, "stderr": 0.25, "n_problems": 2, "k": 2, "grader": "math_verify", **both},
               "aime": {"avg": 0.5, "stderr": 0.5, "n_problems": 2, "k": 2, "grader": "hendrycks_boxed"}}
    table = results_table(results, 2).splitlines()
    assert table[0] == "| data | grader | avg@2 | stderr | problems |"
    assert table[2:] == ["| math500 | math_verify | 75.00 | 25.00 | 2 |",
                         "| math500 | hendrycks_boxed | 25.00 | 25.00 | 2 |",
                         "| aime | hendrycks_boxed | 50.00 | 50.00 | 2 |",
                         "math500: graders agree on 50.0% of 4 samples (correct only by math_verify: 2, "
                         "only by hendrycks_boxed: 0)"]
    for bad in [(), ("math_verify", "math_verify"), ("sympy",), ("math_verify", "hendrycks_boxed", "x")]:
        with pytest.raises(S2DError, match="give one or two different graders"):
            Evaluator(sets=[], k=1, temperature=1.0, top_p=1.0, max_new_tokens=1, instruction=None, seed=0,
                      graders=bad)
