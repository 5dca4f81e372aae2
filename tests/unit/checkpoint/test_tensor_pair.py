"""The one safetensors + JSON reader/writer of run-folder state (RNG states, the teacher-sample cache)."""

import pytest
import torch

from megatron_s2d.checkpoint.tensor_pair import pair_exists, read_pair, write_pair
from megatron_s2d.errors import S2DError


def test_round_trip_and_refusals_name_the_file_and_the_fix(tmp_path):
    prefix = tmp_path / "sub" / "rank_00000"
    write_pair(prefix, {"x": torch.arange(3)}, {"format": "f/v1", "n": 3})
    assert pair_exists(prefix) and not list(prefix.parent.glob("*.tmp"))
    header, tensors = read_pair(prefix, "f/v1", "thing", fix="do X")
    assert header == {"format": "f/v1", "n": 3} and torch.equal(tensors["x"], torch.arange(3))
    with pytest.raises(S2DError, match=r"rank_00000\.json: field 'format' = 'f/v1', expected 'f/v2' \(thing\); do X"):
        read_pair(prefix, "f/v2", "thing", fix="do X")
    prefix.with_suffix(".json").unlink()
    with pytest.raises(S2DError, match=r"rank_00000\.json: no thing here; do X"):
        read_pair(prefix, "f/v1", "thing", fix="do X")
