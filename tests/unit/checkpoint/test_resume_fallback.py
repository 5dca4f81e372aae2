"""Resume picks the newest *intact* checkpoint: a truncated, missing or changed file (or no manifest) in the newest one
is named, that checkpoint is set aside (never resumed from, counted or made a stage's final checkpoint again) and the
previous one is used; with none left the answer is None (the stage starts over, loudly). Fake checkpoint folders,
one process."""

import json
import os
from pathlib import Path

import pytest

from megatron_s2d.checkpoint.manifest import verify_manifest, write_manifest
from megatron_s2d.checkpoint.train_ckpt import complete_checkpoints, latest_checkpoint, resume_checkpoint


def _fake_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"step_{step:06d}"
    for sub in ("model", "optim", "rng"):
        (ckpt / sub).mkdir(parents=True)
    for rank in range(2):
        (ckpt / "model" / f"__{rank}_0.distcp").write_bytes(os.urandom(4000 + step))
        (ckpt / "optim" / f"__{rank}_0.distcp").write_bytes(os.urandom(8000 + step))
        (ckpt / "rng" / f"rank_{rank:05d}.json").write_text("{}")
    (ckpt / "model" / ".metadata").write_bytes(b"meta")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(ckpt)
    (root / "latest").write_text(ckpt.name + "\n")
    return ckpt


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(root, step)
    return root


def _resume(root):
    lines = []
    return resume_checkpoint(root, log=lines.append), "\n".join(lines)


def test_intact_newest_is_chosen_and_nothing_moves(root):
    (root / "step_000008.tmp" / "model").mkdir(parents=True)  # an interrupted save
    chosen, log = _resume(root)
    assert chosen == root / "step_000006" and log == ""
    assert not (root / "step_000008.tmp").exists()
    assert [p.name for p in complete_checkpoints(root)] == ["step_000006", "step_000004", "step_000002"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "no_manifest"])
def test_damaged_newest_falls_back_and_is_set_aside(root, damage):
    newest = root / "step_000006"
    victim = newest / "optim" / "__1_0.distcp"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[:100])
    elif damage == "delete":
        victim.unlink()
    elif damage == "flip":
        victim.write_bytes(data[:50] + bytes([data[50] ^ 0x10]) + data[51:])
    else:
        (newest / "manifest.json").unlink()
    chosen, log = _resume(root)
    assert chosen == root / "step_000004"
    assert f"checkpoint {newest} is damaged" in log
    name = "manifest.json" if damage == "no_manifest" else "optim/__1_0.distcp"
    assert str(newest / name) in log
    assert {"truncate": "100 bytes, the manifest says", "delete": "missing", "flip": "checksum differs",
            "no_manifest": "the save was cut short"}[damage] in log
    # set aside: no longer a checkpoint, `latest` and the stage's final checkpoint point at the one resumed
    assert (root / "step_000006.damaged").is_dir() and not newest.exists()
    assert f"set aside as {root / 'step_000006.damaged'}" in log
    assert latest_checkpoint(root) == root / "step_000004"
    assert [p.name for p in complete_checkpoints(root)] == ["step_000004", "step_000002"]
    # a second round of damage to a re-written step 6 does not clobber the first evidence
    _fake_checkpoint(root, 6)
    (root / "step_000006" / "manifest.json").write_text("{not json")
    chosen, log = _resume(root)
    assert chosen == root / "step_000004" and "manifest.json: unreadable" in log
    assert (root / "step_000006.damaged").is_dir() and (root / "step_000006.damaged-1").is_dir()


def test_every_checkpoint_damaged_gives_none_and_removes_latest(root):
    for ckpt in complete_checkpoints(root):
        (ckpt / "model" / "__0_0.distcp").write_bytes(b"")
    chosen, log = _resume(root)
    assert chosen is None
    assert log.count("is damaged") == 3 and not (root / "latest").exists()
    assert "WARNING: none of the 3 checkpoint(s) under" in log and "starts over from its initial weights" in log
    assert latest_checkpoint(root) is None and complete_checkpoints(root) == []


def test_two_damaged_in_a_row_fall_back_two(root):
    (root / "step_000006" / "model" / "__0_0.distcp").unlink()
    (root / "step_000004" / "trainer_state.json").write_text('{"step": 5}')  # same size, other bytes
    chosen, log = _resume(root)
    assert chosen == root / "step_000002"
    assert "step_000004/trainer_state.json: checksum differs" in log


def test_old_format_checkpoint_is_named_as_such(tmp_path):
    old = tmp_path / "step_000003"
    (old / "rng").mkdir(parents=True)
    (old / "rng" / "rank_00000.pt").write_bytes(b"\x80\x04N.")
    (old / "trainer_state.json").write_text("{}")
    chosen, log = _resume(tmp_path)
    assert chosen is None and "an older megatron-s2d (pickled RNG state, no manifest)" in log


def test_sizes_only_verification_skips_checksums(root):
    victim = root / "step_000006" / "model" / "__0_0.distcp"
    data = victim.read_bytes()
    victim.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert verify_manifest(root / "step_000006", checksums=False) == []
    assert verify_manifest(root / "step_000006") == [f"{victim}: checksum differs from the manifest (corrupted)"]
