"""A stage that died after its final checkpoint but before COMPLETE (e.g. during its final evaluation), and whose
final checkpoint is damaged: the re-run names the file, resumes from the previous checkpoint, and the stage's final
checkpoint is a fresh, intact one (never the damaged one, which ``latest`` pointed at), with the damaged one set
aside for inspection."""

import json
from pathlib import Path

import pytest

from megatron_s2d.checkpoint.manifest import verify_manifest
from tests.functional.conftest import mini_plan, s2d, write_plan

pytestmark = pytest.mark.functional


def test_damaged_final_checkpoint_of_an_unfinished_stage_is_redone(mini_world, tmp_path):
    stages = [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "steps": 2, "save_every": 1,
               "eval": False}]
    run = tmp_path / "run"
    plan = write_plan(tmp_path / "plan.yaml", mini_plan(mini_world, run, stages, eval={"k": 2, "include_base": False}))
    s2d("run", plan)
    stage = run / "stages" / "teacher_rl"
    ckpts = stage / "checkpoints"
    final = ckpts / "step_000002"
    for f in ("COMPLETE", "lineage.json"):  # died after the final save, before COMPLETE
        (stage / f).unlink()
    victim = sorted((final / "optim").glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:-1])  # one byte short
    proc = s2d("run", plan)
    assert f"checkpoint {final} is damaged" in proc.stdout and victim.name in proc.stdout, proc.stdout[-3000:]
    assert f"resumed from {ckpts / 'step_000001'} at step 1" in proc.stdout
    lineage = json.loads((stage / "lineage.json").read_text())
    assert Path(lineage["final_checkpoint"]) == final and lineage["steps"] == 2
    assert verify_manifest(final) == []  # re-written, intact
    assert (ckpts / "step_000002.damaged" / "optim" / victim.name).stat().st_size == victim.stat().st_size - 1
