"""Nothing in a run folder is unpickled: RNG states and the teacher-sample cache round-trip through safetensors +
JSON, and a planted pickle payload where they are expected is refused without running its code. Manifests name a
truncated, missing or changed checkpoint file."""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_s2d.checkpoint.manifest import verify_manifest, write_manifest
from megatron_s2d.checkpoint.rng_state import load_rng_state, save_rng_state
from megatron_s2d.errors import S2DError
from megatron_s2d.rollout.base import Sample
from megatron_s2d.rollout.sample_store import load_samples, save_samples


class _Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))


def test_rng_state_round_trip_without_pickle(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cuda": None, "tracker": {"model-parallel-rng": torch.get_rng_state()}}
    save_rng_state(tmp_path / "rank_00000", state)
    got = load_rng_state(tmp_path / "rank_00000")
    assert torch.equal(got["torch"], state["torch"]) and got["python"] == state["python"]
    assert got["numpy"][0] == state["numpy"][0] and np.array_equal(got["numpy"][1], state["numpy"][1])
    assert got["numpy"][2:] == tuple(state["numpy"][2:])
    assert torch.equal(got["tracker"]["model-parallel-rng"], state["tracker"]["model-parallel-rng"])
    random.setstate(got["python"])
    a = random.random()
    random.setstate(state["python"])
    assert a == random.random()


def test_planted_pickle_rng_state_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "rng" / "rank_00000.pt", marker)
    with pytest.raises(S2DError, match="pickled RNG state .* not loaded"):
        load_rng_state(tmp_path / "rng" / "rank_00000")
    assert not marker.exists()


def _samples(topk: bool):
    return [[Sample([1, 2, 3], [4, 5], [-0.5, -1.25], "stop", [[4, 9], [5, 8]] if topk else None,
                    [[-0.5, -2.0], [-1.25, -3.0]] if topk else None),
             Sample([1, 2], [6], [-0.125], "length", [[6, 1]] if topk else None, [[-0.125, -4.0]] if topk else None)],
            [Sample([7], [], [], "length", [] if topk else None, [] if topk else None)]]


@pytest.mark.parametrize("topk", [True, False])
def test_sample_cache_round_trip(tmp_path, topk):
    per_step = _samples(topk)
    save_samples(tmp_path / "dp_rank_00000", per_step)
    assert load_samples(tmp_path / "dp_rank_00000") == per_step


def test_planted_pickle_sample_cache_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "teacher_cache" / "dp_rank_00000.pt", marker)
    with pytest.raises(S2DError, match="pickled sample cache .* not loaded"):
        load_samples(tmp_path / "teacher_cache" / "dp_rank_00000")
    assert not marker.exists()


def test_manifest_names_the_damaged_file(tmp_path):
    ckpt = tmp_path / "step_000002"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "__0_0.distcp").write_bytes(os.urandom(5000))
    (ckpt / "model" / "__1_0.distcp").write_bytes(os.urandom(3000))
    (ckpt / "trainer_state.json").write_text("{}")
    write_manifest(ckpt)
    assert verify_manifest(ckpt) == []
    data = (ckpt / "model" / "__0_0.distcp").read_bytes()
    (ckpt / "model" / "__0_0.distcp").write_bytes(data[:1000])  # truncated
    assert any("__0_0.distcp: 1000 bytes, the manifest says 5000" in p for p in verify_manifest(ckpt))
    (ckpt / "model" / "__0_0.distcp").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    assert any("__0_0.distcp: checksum differs" in p for p in verify_manifest(ckpt))
    (ckpt / "model" / "__0_0.distcp").write_bytes(data)
    (ckpt / "model" / "__1_0.distcp").unlink()
    assert verify_manifest(ckpt) == [f"{ckpt / 'model' / '__1_0.distcp'}: missing"]
    (ckpt / "manifest.json").unlink()
    assert "manifest.json: missing" in verify_manifest(ckpt)[0]
