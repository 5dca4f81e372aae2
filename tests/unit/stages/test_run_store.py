"""RunStore: parents resolve to their final checkpoints (or a clear error naming the stage to run first), metrics
lines survive a resume up to the checkpoint's step, and COMPLETE is written last, after the lineage."""

import json
from pathlib import Path

import pytest

from megatron_s2d.config import plan_from_dict
from megatron_s2d.errors import S2DError
from megatron_s2d.stages.counters import Ledger, StageState, StepCounters
from megatron_s2d.stages.layout import RunLayout
from megatron_s2d.stages.store import MetricsLog, RunStore
from tests.unit.config.test_plan_config import BASE


def _store(tmp_path, name="opd"):
    plan = plan_from_dict({**BASE, "run_dir": str(tmp_path)})
    stage = next(s for s in plan.stages if s.name == name)
    return RunStore(RunLayout.of(tmp_path), plan, stage, is_main=True), plan


def _fake_model_ckpt(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "s2d_model.json").write_text("{}")
    return path


def test_parent_resolution(tmp_path):
    store, _ = _store(tmp_path)
    with pytest.raises(S2DError, match="needs stage 'fkl', which has not completed"):
        store.checkpoint_of("fkl", "student")
    final = _fake_model_ckpt(tmp_path / "stages" / "fkl" / "checkpoints" / "step_000002")
    (tmp_path / "stages" / "fkl" / "lineage.json").write_text(json.dumps({"final_checkpoint": str(final)}))
    with pytest.raises(S2DError, match="COMPLETE is missing"):  # a lineage without COMPLETE is stale
        store.checkpoint_of("fkl", "student")
    (tmp_path / "stages" / "fkl" / "COMPLETE").write_text(str(final))
    assert store.checkpoint_of("fkl", "student") == final
    with pytest.raises(S2DError, match="not a megatron-s2d model checkpoint"):
        store.checkpoint_of("base", "student")
    base = _fake_model_ckpt(tmp_path / "models" / "student_base")
    assert store.checkpoint_of(None, "student") == base


def test_metrics_log_truncates_to_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in range(4):
        log.append(step, {"loss": float(step)})
    log.truncate(2)  # resumed from the checkpoint of step 2: lines 3 and 4 will be recomputed
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    MetricsLog(tmp_path / "off.jsonl", enabled=False).append(0, {"x": 1.0})
    assert not (tmp_path / "off.jsonl").exists()


def test_finish_writes_lineage_then_complete(tmp_path):
    store, plan = _store(tmp_path, "t_rl")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"1H": {"content_hash": "abc", "count": 3}}))
    init = _fake_model_ckpt(tmp_path / "models" / "teacher_base")
    final = tmp_path / "stages" / "t_rl" / "checkpoints" / "step_000002"
    state = StageState(step=2, ledger=Ledger(labels_consumed=4, prompts=8))
    store.finish(final, state, init, {"label": "t_rl", "results": {}})
    lineage = json.loads((tmp_path / "stages" / "t_rl" / "lineage.json").read_text())
    assert lineage["final_checkpoint"] == str(final) and lineage["ledger"]["labels_consumed"] == 4
    assert lineage["labels_used_by_lineage"] == ["1H"] and lineage["split_manifests"]["1H"]["content_hash"] == "abc"
    assert RunLayout.of(tmp_path).is_complete("t_rl")
    assert json.loads((tmp_path / "stages" / "t_rl" / "eval.json").read_text())["label"] == "t_rl"


def test_ledger_adds_reduced_counters():
    led = Ledger()
    led.add(StepCounters(prompts=4, generated_tokens=100, teacher_scored_tokens=100))
    led.add(StepCounters(prompts=4, generated_tokens=50))
    assert (led.prompts, led.generated_tokens, led.teacher_scored_tokens) == (8, 150, 100)
    assert StepCounters(prompts=3).all_reduce(None).prompts == 3  # no process group: nothing to sum


def test_damaged_run_folder_files_are_named(tmp_path):
    """The stage job's reads of the run folder go through ``errors.read_json``: a file cut short names itself."""
    from megatron_s2d.data.split_store import read_manifests, read_split

    store, _ = _store(tmp_path)
    lineage = tmp_path / "stages" / "fkl" / "lineage.json"
    lineage.parent.mkdir(parents=True)
    lineage.write_text('{"final_checkpoint": "/x')
    (lineage.parent / "COMPLETE").write_text("/x\n")
    with pytest.raises(S2DError, match=rf"^{lineage}: damaged JSON \("):
        store.checkpoint_of("fkl", "student")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2, "lo\n')
    with pytest.raises(S2DError, match=rf"^{metrics}: damaged JSON at line 2"):
        MetricsLog(metrics, enabled=True).truncate(1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "splits.json").write_text('{"1H": {"count": 3, ')
    with pytest.raises(S2DError, match=rf"^{data / 'splits.json'}: damaged JSON"):
        read_manifests(data)
    with pytest.raises(S2DError, match=rf"^{data / 'splits.json'}: damaged JSON"):
        read_split(data, "1H")
