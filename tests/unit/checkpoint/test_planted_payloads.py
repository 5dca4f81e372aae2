"""A pickle payload planted anywhere a run folder is read is refused without running: as the dist checkpoint's
``.metadata`` (which torch reads with plain pickle) or ``common.pt`` (megatron's torch.load), as the RNG state's or
the teacher cache's safetensors / JSON. The payload would create a marker file; the marker must stay absent and the
error must be an S2DError naming the file. Also: the sample cache's exact round trip at its edges."""

import dataclasses
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from megatron_s2d.checkpoint.rng_state import load_rng_state
from megatron_s2d.checkpoint.safe_load import check_dist_checkpoint, check_metadata_file
from megatron_s2d.errors import S2DError
from megatron_s2d.rollout import sample_store
from megatron_s2d.rollout.base import Sample


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload(marker: Path) -> bytes:
    return pickle.dumps({"state_dict_metadata": _Payload(marker)})


def test_planted_dcp_metadata_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "step_000002" / "model"
    weights.mkdir(parents=True)
    (weights / ".metadata").write_bytes(_payload(marker))
    with pytest.raises(S2DError, match=r"\.metadata: not loaded.*asks for posix\.system"):
        check_dist_checkpoint(weights)
    assert not marker.exists()
    (weights / ".metadata").write_bytes(b"\x80\x04\x95")  # truncated pickle: refused the same way
    with pytest.raises(S2DError, match="not loaded"):
        check_metadata_file(weights / ".metadata")


def test_planted_common_pt_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "model"
    weights.mkdir()
    torch.save({"ok": torch.zeros(2)}, weights / "common.pt")
    check_dist_checkpoint(weights)  # a weights-only file passes
    (weights / "common.pt").write_bytes(_payload(marker))
    with pytest.raises(S2DError, match=r"common\.pt: not loaded: it is not a weights-only torch file"):
        check_dist_checkpoint(weights)
    assert not marker.exists()


def test_real_dcp_metadata_passes(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter, save

    state = {"w": torch.randn(3, 4), "b": torch.arange(5), "extra": {"step": 3, "note": "x"}}
    save(state, storage_writer=FileSystemWriter(str(tmp_path / "model")), no_dist=True)
    assert (tmp_path / "model" / ".metadata").is_file()
    check_dist_checkpoint(tmp_path / "model")


@pytest.mark.parametrize("where", ["safetensors", "json"])
def test_planted_pickle_as_rng_files_is_refused_unrun(tmp_path, where):
    marker = tmp_path / "pwned"
    prefix = tmp_path / "rng" / "rank_00000"
    prefix.parent.mkdir()
    prefix.with_suffix(".safetensors").write_bytes(_payload(marker))
    prefix.with_suffix(".json").write_bytes(_payload(marker) if where == "json" else b'{"format": "x"}')
    with pytest.raises(S2DError, match="unreadable RNG state"):
        load_rng_state(prefix)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["safetensors", "json"])
def test_planted_pickle_as_sample_cache_is_refused_unrun(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "teacher_cache" / "dp_rank_00000"
    sample_store.save_samples(path, [[Sample([1], [2], [-0.5], "stop")]])
    target = path.with_suffix(f".{where}")
    target.write_bytes(_payload(marker))
    with pytest.raises(S2DError, match="unreadable sample cache .* delete it to regenerate"):
        sample_store.load_samples(path)
    assert not marker.exists()


def test_sample_cache_with_tensors_of_another_cache_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sample_store.save_samples(a, [[Sample([1, 2], [3, 4], [-1.0, -2.0], "stop")]])
    sample_store.save_samples(b, [[Sample([1], [3], [-1.0], "length")]])
    b.with_suffix(".json").write_bytes(a.with_suffix(".json").read_bytes())  # header of a, tensors of b
    with pytest.raises(S2DError, match="header and the tensors disagree"):
        sample_store.load_samples(b)


def test_sample_store_knows_every_sample_field():
    """Adding a field to Sample must come with storing it (else the teacher cache silently drops it)."""
    assert [f.name for f in dataclasses.fields(Sample)] == [
        "prompt_ids", "response_ids", "logprobs", "finish_reason", "topk_ids", "topk_logprobs"]


def test_sample_cache_exact_round_trip_of_fp32_values_and_empty_topk(tmp_path):
    rng = random.Random(0)

    def fp32(x):
        return torch.tensor(x, dtype=torch.float32).item()

    def sample(n, k):
        return Sample([rng.randrange(100) for _ in range(rng.randrange(1, 6))], [rng.randrange(1 << 40) for _ in range(n)],
                      [fp32(-rng.random() * 9) for _ in range(n)], rng.choice(["stop", "length"]),
                      [[rng.randrange(50000) for _ in range(k)] for _ in range(n)],
                      [[fp32(-rng.random() * 20) for _ in range(k)] for _ in range(n)])

    per_step = [[sample(rng.randrange(0, 7), 3) for _ in range(4)], [], [sample(0, 3)]]
    sample_store.save_samples(tmp_path / "c", per_step)
    assert sample_store.load_samples(tmp_path / "c") == per_step
    only_empty = [[Sample([5], [], [], "length", [], [])]]  # top-k requested, no response token anywhere
    sample_store.save_samples(tmp_path / "e", only_empty)
    assert sample_store.load_samples(tmp_path / "e") == only_empty
