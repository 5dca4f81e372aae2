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
