"""Every recipe in run_configs/ (and the cluster profile example) passes the SLURM dry run: layouts and memory
validate against the shipped HF configs, and NeMo-Run renders one sbatch script per job.

``base_*.yaml`` are bases, not plans (they lack models). No cluster and no weights are needed.
"""

from pathlib import Path

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.config.validate import topo_order
from megatron_s2d.launch.experiment import dry_run, launch_plan
from tests.functional.conftest import s2d

pytestmark = pytest.mark.functional

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO_ROOT / "run_configs").glob("*.yaml") if not p.name.startswith("base_"))
PROFILES = [REPO_ROOT / "slurm" / "cluster_example.yaml"]


@pytest.mark.parametrize("path", RECIPES + PROFILES, ids=lambda p: p.name)
def test_recipe_dry_run(path: Path, tmp_path, capsys):
    plan = load_plan(path, [f"run_dir={tmp_path / 'run'}", f"launch.slurm.job_dir={tmp_path / 'jobs'}"])
    planned = launch_plan(plan, str(tmp_path / "run" / "plan.resolved.yaml"), executor="slurm", dry_run=True)
    stages = [s.name for s in topo_order(plan)]
    expected = (["base_eval"] if plan.eval.include_base else []) + stages + ["report"]
    assert [j.name for j in planned.jobs] == expected
    for name in expected:
        script = tmp_path / "run" / "dry_run" / f"{name}.sbatch"
        text = script.read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH --requeue" in text
        if name != "report":
            assert f"#SBATCH --nodes={plan.launch.nodes}\n" in text and "#SBATCH --signal=USR1@" in text
            assert f"--stage {name}" in text
    out = capsys.readouterr().out
    assert f"dry run OK: {len(expected)} job(s)" in out
    assert all(c.memory.fits and c.memory.train_peak_gib <= plan.launch.gpu_memory_gib
               and c.memory.gen_peak_gib <= plan.launch.gpu_memory_gib for c in planned.checks)


def test_gpu_recipes_use_real_model_sizes(tmp_path):
    plan = load_plan(REPO_ROOT / "run_configs" / "llama3.3_70b_to_llama3.1_8b.yaml", [f"run_dir={tmp_path}"])
    planned = launch_plan(plan, str(tmp_path / "plan.resolved.yaml"), executor="slurm", dry_run=True)
    opd = next(c for c in planned.checks if c.job.name == "opd")
    assert opd.layouts == {"student": (2, 1, 16), "teacher": (8, 2, 2)}
    assert round(opd.params["teacher"] / 1e9, 2) == 70.55 and round(opd.params["student"] / 1e9, 2) == 8.03


# every shipped GPU plan: the teacher -> student recipes, Table 2's size ladder (grpo_qwen3_*), the same-size route
GPU_RECIPES = [p.name for p in RECIPES if not p.name.startswith("toy_")]


def _rows(out: str) -> dict[str, dict[str, str]]:
    """The dry-run table's job rows as {job: {column: cell}} (columns split on runs of 2+ spaces)."""
    import re

    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("job "))
    head = re.split(r"\s{2,}", lines[i].strip())
    rows = {}
    for line in lines[i + 2:]:
        if line.startswith("("):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(head, cells))
    return rows


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_fit_in_both_phases(recipe, tmp_path):
    """The real ``s2d`` console script: every job of the shipped GPU recipes fits its GPUs while it trains
    (``train_peak``) and while it generates (``gen_peak``: vLLM's derived share next to what stays resident)."""
    proc = s2d("run", f"run_configs/{recipe}", "--dry-run", f"run_dir={tmp_path / 'run'}",
               f"launch.slurm.job_dir={tmp_path / 'jobs'}", timeout=300)
    assert "dry run OK" in proc.stdout and "!" not in proc.stdout.split("(memory in GiB")[0]
    rows = _rows(proc.stdout)
    assert set(rows) == {"base_eval", "report"} | {s.name for s in load_plan(REPO_ROOT / "run_configs" / recipe,
                                                                             [f"run_dir={tmp_path}"]).stages}
    budget = float(next(iter(rows.values()))["budget"])
    assert budget == 79  # base_gpu.yaml: an H100 80 GB as CUDA reports it
    for job, row in rows.items():
        if job == "report":
            continue
        assert float(row["gen_peak"]) <= budget, (job, row)
        assert row["train_peak"] == "-" if job == "base_eval" else float(row["train_peak"]) <= budget, (job, row)
        if job != "base_eval":
            assert " u=0." in row["generation"] and not row["generation"].endswith(" set"), row  # derived


def test_vllm_share_that_cannot_fit_is_refused_naming_the_field(tmp_path):
    """``gpu_memory_utilization=0.9`` on the 70B teacher: 0.9 x 79 GiB next to the 19.4 GiB that stay resident while
    it generates (weights, FP8 caches, CUDA context) cannot fit. The dry run prints the table with the job flagged,
    then fails naming the field and the most that fits."""
    proc = s2d("run", "run_configs/llama3.3_70b_to_llama3.1_8b.yaml", "--dry-run", f"run_dir={tmp_path / 'run'}",
               f"launch.slurm.job_dir={tmp_path / 'jobs'}", "stages.teacher_rl.rollout.vllm.gpu_memory_utilization=0.9",
               timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    row = _rows(proc.stdout)["teacher_rl"]
    assert row["generation"].endswith("u=0.90 set") and row["gen_peak"].endswith("!")
    assert "dry run OK" not in proc.stdout
    assert "found 1 problem(s)" in proc.stderr
    assert ("stages.teacher_rl.rollout.vllm.gpu_memory_utilization = 0.9: vLLM takes 0.9 x 79 = 71.1 GiB per GPU "
            "while awake") in proc.stderr
    assert "at most 0.75 fits" in proc.stderr


def test_cli_dry_run_entry_local(tmp_path, capsys):
    """``dry_run`` (what ``s2d run --dry-run`` calls) on the toy recipe with the local executor: command files."""
    plan = load_plan(REPO_ROOT / "run_configs" / "toy_cpu.yaml", [f"run_dir={tmp_path}"])
    assert dry_run(plan, "run_configs/toy_cpu.yaml", executor="local") == 0
    out = capsys.readouterr().out
    assert "dry run of run_configs/toy_cpu.yaml" in out and "teacher_rl" in out
    text = (tmp_path / "dry_run" / "opd.sh").read_text()
    # one local process: the entry runs directly, without a torchrun agent in front (~6 s less per job)
    assert f"python -m megatron_s2d.stages.entry --plan {tmp_path}/plan.resolved.yaml --stage opd" in text
    assert "megatron_s2d.launch.agent" not in text
    assert not (tmp_path / "dry_run" / "report.sh").exists()  # local: the CLI writes the report itself


def test_auto_placement_is_chosen_priced_and_recorded_through_console_script(tmp_path):
    """``rollout.placement: auto`` on the 70B recipe: ``s2d run --dry-run`` prints each stage's choice with both
    prices, the table prices the choice, and the resolved plan (what the jobs would read) records it."""
    import yaml

    run_dir = tmp_path / "run"
    proc = s2d("run", "run_configs/llama3.3_70b_to_llama3.1_8b.yaml", "--dry-run", f"run_dir={run_dir}",
               f"launch.slurm.job_dir={tmp_path / 'jobs'}", "stages.opd.rollout.placement=auto",
               "stages.student_rl.rollout.placement=auto", "stages.student_rl.rollout.max_staleness=1")
    out = proc.stdout
    assert "dry run OK" in out, out[-3000:]
    # on-policy OPD: colocated is cheaper on the price model; one step ahead needs ranks of its own (auto picks N)
    assert "[s2d] stages.opd.rollout.placement: auto -> colocated (priced: colocated " in out
    chosen = next(line for line in out.splitlines() if "stages.student_rl.rollout.placement: auto -> " in line)
    n = int(chosen.split("auto -> separate, ")[1].split()[0])
    assert f"separate on {n} of 32 ranks" in chosen
    resolved = yaml.safe_load((run_dir / "dry_run" / "plan.resolved.yaml").read_text())
    by_name = {s["name"]: s["rollout"] for s in resolved["stages"]}
    assert (by_name["student_rl"]["placement"], by_name["student_rl"]["generation_ranks"]) == ("separate", n)
    assert by_name["opd"]["placement"] == "colocated"
    assert any(line.startswith("student_rl") and "separate k=1" in line for line in out.splitlines())
