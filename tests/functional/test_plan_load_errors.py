"""Through the installed ``s2d`` console script: errors that used to surface late, under internal names (a token
budget past the model's context at step 0 inside the job; a missing data source after the base models were
imported; a stage name that writes outside the run folder), are refused with exit 2 naming the plan field, by the dry
run and by a run before it imports anything."""

import pytest

from tests.functional.conftest import s2d

pytestmark = pytest.mark.functional

TOY = "run_configs/toy_cpu.yaml"


@pytest.mark.parametrize("override,message", [
    ("stages.opd.rollout.max_new_tokens=200",
     "stages.opd.rollout.max_new_tokens = 200 + data.max_prompt_tokens = 128 is 328 tokens, past the context of "
     "models.student (max_position_embeddings = 256)"),
    ("data.eval=[{name: gone, source: /no/such/eval.jsonl}]",
     "data.eval[0].source = '/no/such/eval.jsonl': neither a registered dataset"),
    ("stages.student_rl.name=../../x", "stages[3].name = '../../x': a stage name must match [A-Za-z][A-Za-z0-9_]*"),
])
def test_dry_run_refuses_at_plan_load_naming_the_field(tmp_path, override, message):
    proc = s2d("run", TOY, f"run_dir={tmp_path / 'run'}", override, "--dry-run", check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists() and not (tmp_path / "run" / "dry_run").exists()


def test_run_refuses_a_missing_pool_before_importing_the_base_models(tmp_path):
    run = tmp_path / "run"
    proc = s2d("run", TOY, f"run_dir={run}", f"data.pool={tmp_path / 'pool.jsonl'}", check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert f"data.pool = '{tmp_path / 'pool.jsonl'}': neither a registered dataset" in proc.stderr
    assert not (run / "models").exists() and not (run / "stages").exists()
