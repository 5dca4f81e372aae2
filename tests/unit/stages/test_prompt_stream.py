"""PromptStream: a step's prompts are a function of the step alone (resume draws the same ones), DP shares are
disjoint contiguous blocks that cover the step, epochs are seeded permutations, seeds differ where they must."""

import pytest

from megatron_s2d.data.types import Problem
from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.stages.prompts import PromptStream

PROBLEMS = [Problem(id=str(i), prompt=f"q{i}", answer=str(i), source="t") for i in range(10)]


def _stream(rank=0, size=1, seed=3):
    return PromptStream(PROBLEMS, [[i] for i in range(10)], seed=seed, stage="s", split="1H", dp_rank=rank,
                        dp_size=size)


def test_shares_are_disjoint_contiguous_and_cover_the_step():
    whole = _stream().global_indices(2, 4)
    shares = [_stream(r, 2).step(2, 4) for r in range(2)]
    assert shares[0].indices + shares[1].indices == whole
    assert shares[0].prompt_ids == [[i] for i in shares[0].indices]
    assert shares[1].answers == [str(i) for i in shares[1].indices]


def test_stateless_in_the_step_and_one_permutation_per_epoch():
    s = _stream()
    assert s.global_indices(1, 3) == _stream().global_indices(1, 3)  # a resumed job draws the same prompts
    epoch0 = [i for step in range(5) for i in s.global_indices(step, 2)]  # 10 prompts = one pass
    assert sorted(epoch0) == list(range(10))
    epoch1 = s.global_indices(5, 2) + s.global_indices(6, 2)
    assert epoch1 != epoch0[:4]  # the next epoch is another permutation
    assert _stream(seed=4).global_indices(0, 10) != epoch0


def test_seeds_depend_on_step_rank_and_purpose():
    a, b = _stream(0, 2).step(0, 4), _stream(1, 2).step(0, 4)
    assert len({a.seed(0), a.seed(1), b.seed(0), _stream(0, 2).step(1, 4).seed(0)}) == 4
    assert a.seed(0) == _stream(0, 2).step(0, 4).seed(0)


def test_labels_counted_as_distinct_problems_and_errors():
    s = _stream()
    assert s.distinct_until(0, 4) == 4 and s.distinct_until(5, 4) == 10
    with pytest.raises(InternalError, match="do not divide"):
        _stream(0, 3).step(0, 4)
    with pytest.raises(S2DError, match="split '1H' is empty"):
        PromptStream([], [], seed=0, stage="s", split="1H", dp_rank=0, dp_size=1)


def test_prompts_longer_than_data_max_prompt_tokens_are_refused_naming_the_row():
    ids = [[1] * (3 if i in (4, 7) else 2) for i in range(10)]  # rows 4 and 7: 3 tokens
    kw = dict(seed=3, stage="s", split="1H", dp_rank=0, dp_size=1)
    assert PromptStream(PROBLEMS, ids, max_prompt_tokens=3, **kw).step(0, 2)  # at the limit: accepted
    with pytest.raises(S2DError, match=r"stages\.s: split '1H' row 4 \(problem '4'\) is a 3-token prompt, longer "
                                       r"than data\.max_prompt_tokens = 2 \(2 of the split's 10 prompts"):
        PromptStream(PROBLEMS, ids, max_prompt_tokens=2, **kw)
