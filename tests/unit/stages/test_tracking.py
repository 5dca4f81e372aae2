"""Tracking: every step's metrics reach TensorBoard (read back with TensorBoard's own reader) and, opt-in, an offline
W&B run (read back from the run's ``.wandb`` file); a resume leaves no step twice; a missing package is an
actionable error; a tracker that fails mid-stage is switched off, not fatal."""

import importlib.util
import json
import time
import struct
import zlib
from pathlib import Path

import pytest

from megatron_s2d.config import plan_from_dict
from megatron_s2d.errors import S2DError
from megatron_s2d.stages.layout import RunLayout
from megatron_s2d.stages.store import RunStore
from megatron_s2d.stages.tracking import read_tensorboard, wandb_group
from tests.unit.config.test_plan_config import BASE


def _store(tmp_path, stage="t_rl", **tracking):
    plan = plan_from_dict({**BASE, "run_dir": str(tmp_path), "tracking": tracking})
    return RunStore(RunLayout.of(tmp_path), plan, next(s for s in plan.stages if s.name == stage), is_main=True), plan


def _metrics(step: int, attempt: int = 0) -> dict[str, float]:
    return {"reward_mean": 0.1 * step + attempt, "kl_mean": 2.0 * step, "clip_frac": 0.01 * step, "step_time_s": 1.5}


def test_tensorboard_one_run_per_stage_metric_names_as_tags(tmp_path):
    store, _ = _store(tmp_path)
    for step in range(3):
        store.metrics.append(step, _metrics(step + 1))
    store.metrics.close()
    logdir = tmp_path / "stages" / "t_rl" / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents.") for p in logdir.iterdir())
    scalars = read_tensorboard(logdir)
    assert set(scalars) == {"reward_mean", "kl_mean", "clip_frac", "step_time_s"}
    assert [s for s, _ in scalars["reward_mean"]] == [1, 2, 3]
    assert [v for _, v in scalars["kl_mean"]] == [2.0, 4.0, 6.0]
    assert scalars["reward_mean"][1][1] == pytest.approx(0.2)
    lines = [json.loads(ln) for ln in (tmp_path / "stages" / "t_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3]  # metrics.jsonl unchanged next to it


def test_resume_recomputes_steps_without_duplicates(tmp_path):
    store, _ = _store(tmp_path)
    for step in range(4):  # the first attempt got to step 4, its last checkpoint was at step 2
        store.metrics.append(step, _metrics(step + 1))
    store.metrics.close()
    store, _ = _store(tmp_path)  # the resumed job
    store.metrics.truncate(2)
    for step in range(2, 5):  # steps 3.. recomputed (made different here to see which survive), then step 5
        store.metrics.append(step, _metrics(step + 1, attempt=10))
    store.metrics.close()
    scalars = read_tensorboard(tmp_path / "stages" / "t_rl" / "tensorboard")
    for tag, points in scalars.items():
        assert [s for s, _ in points] == [1, 2, 3, 4, 5], tag
    assert [round(v, 4) for _, v in scalars["reward_mean"]] == [0.1, 0.2, 10.3, 10.4, 10.5]


# ---------------------------------------------------------------------------------------------------------- W&B
def _wandb_records(run_file: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic 0xBEE1, version),
    then LevelDB-log framing (32 KiB blocks; each chunk: CRC-32 over type + data, length, type FULL/FIRST/MIDDLE/
    LAST) around ``wandb_internal_pb2.Record`` protobufs. W&B has no public reader of offline runs (``wandb.Api``
    needs the server, and ``wandb.sdk.internal.datastore`` is gone from wandb 0.2x), so this follows the format."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    magic, ident, _version = struct.unpack("<4sHB", data[:7])
    assert (magic, ident) == (b":W&B", 0xBEE1), run_file
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{run_file}: bad CRC at {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(run_file: Path):
    run, history = None, {}
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            row = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            history[rec.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, history


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (requirements/dev.txt)")
def test_wandb_offline_run_grouped_per_plan_run(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    store, plan = _store(tmp_path, wandb=True, wandb_project="s2d-test", wandb_mode="offline")
    for step in range(3):
        store.metrics.append(step, _metrics(step + 1))
    store.metrics.close()
    run_id = (tmp_path / "stages" / "t_rl" / "wandb_run_id").read_text().strip()
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, sorted(p.name for p in (tmp_path / "wandb").iterdir())
    # wandb's offline service (wandb-core, a process of its own) can still be appending records when finish()
    # returns on a loaded machine: read until the run record and the three steps are there (at most 60 s)
    deadline = time.monotonic() + 60
    run, history = _wandb_history(files[0])
    while (run is None or len(history) < 3) and time.monotonic() < deadline:
        time.sleep(0.5)
        run, history = _wandb_history(files[0])
    assert run is not None, f"{files[0]}: no run record"
    assert run.run_group == wandb_group("t", tmp_path.resolve()) and run.run_group.startswith("t-")
    assert (run.display_name, run.job_type, run.project) == ("t_rl", "teacher_rl", "s2d-test")
    assert sorted(history) == [1, 2, 3]
    assert history[2] == pytest.approx(_metrics(2))
    # the stage's TensorBoard run is written next to it all the same
    assert [s for s, _ in read_tensorboard(tmp_path / "stages" / "t_rl" / "tensorboard")["kl_mean"]] == [1, 2, 3]


def test_missing_package_is_an_actionable_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(S2DError, match=r"tracking.wandb needs the 'wandb' package.*pip install wandb"):
        _store(tmp_path, wandb=True)


def test_failing_tracker_is_switched_off_not_fatal(tmp_path, capsys):
    store, _ = _store(tmp_path, tensorboard=True)

    class Broken:
        def log(self, step, metrics):
            raise OSError("disk full")

        def close(self):
            pass

    store.metrics.tracking.sinks = [Broken()]
    store.metrics.append(0, _metrics(1))
    store.metrics.append(1, _metrics(2))
    assert "warning: Broken switched off for this job: OSError: disk full" in capsys.readouterr().err
    assert len((tmp_path / "stages" / "t_rl" / "metrics.jsonl").read_text().splitlines()) == 2
