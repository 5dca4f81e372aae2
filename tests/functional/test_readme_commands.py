"""Every ``s2d`` command the README shows runs, through the installed ``s2d`` console script in a subprocess.

``s2d convert hf-to-megatron ...`` was documented for a release in which it could not run (the parser nested a
second ``convert``), while a unit test of the Python function behind it passed. So these tests type what a user
types: the README's commands, on tiny local models and local data files in the hub schemas (no network), with only
sizes shrunk (``--k``, ``--limit``, ``--max-new-tokens``) and paths replaced.

``test_every_readme_command_is_covered`` fails when the README gains an ``s2d`` command that no test here (or in the
files named in ``COVERED``) runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.functional.conftest import ROOT, s2d

pytestmark = pytest.mark.functional

# README command (its first words) -> the test that runs it through the console script
COVERED = {
    "s2d run run_configs/qwen3_8b_to_1.7b.yaml --dry-run": "test_recipe_dry_run_through_console_script",
    "s2d run run_configs/qwen3_8b_to_1.7b.yaml --executor slurm":
        "tests/functional/test_slurm_real.py (real single-node SLURM; skipped with a reason without one)",
    "s2d run run_configs/toy_cpu_all.yaml": "tests/functional/test_all_routes_plan.py",
    "s2d run PLAN.yaml": "tests/functional/test_pipeline_cli.py::test_plan_end_to_end_lineage_report_and_rerun",
    "s2d convert hf-to-megatron": "test_convert_verify_export_eval_through_console_script",
    "s2d convert megatron-to-hf": "test_convert_verify_export_eval_through_console_script",
    "s2d convert verify": "test_convert_verify_export_eval_through_console_script",
    "s2d eval": "test_convert_verify_export_eval_through_console_script",
    "s2d eval --model release/ --data math500 --k 16 --grader both": "test_eval_grader_both_through_console_script",
    "s2d report": "tests/functional/test_pipeline_cli.py::test_plan_end_to_end_lineage_report_and_rerun",
    "s2d status": "tests/functional/test_cli_front_door.py::test_status_reads_the_run_folder_only",
    "s2d run PLAN.yaml --print-plan":
        "tests/functional/test_cli_front_door.py::test_print_plan_prints_the_resolved_plan_and_writes_nothing",
    "s2d run PLAN.yaml --restart":
        "tests/functional/test_run_folder_drift.py::test_drift_is_refused_and_restart_sets_aside",
}


def readme_commands() -> list[str]:
    """The ``s2d ...`` lines of the README's bash blocks (comments stripped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("s2d "):
                out.append(line)
    return out


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert commands, "README has no s2d commands in bash blocks"
    uncovered = [c for c in commands if not any(c.startswith(prefix) for prefix in COVERED)]
    assert not uncovered, f"README commands no test runs through the console script: {uncovered}"


def test_recipe_dry_run_through_console_script(tmp_path):
    """``s2d run run_configs/qwen3_8b_to_1.7b.yaml --dry-run``: layouts, memory and sbatch scripts, no cluster."""
    run_dir = tmp_path / "run"
    proc = s2d("run", "run_configs/qwen3_8b_to_1.7b.yaml", "--dry-run", f"run_dir={run_dir}",
               f"launch.slurm.job_dir={tmp_path / 'jobs'}")
    assert "dry run OK" in proc.stdout, proc.stdout[-2000:]
    assert list((run_dir / "dry_run").glob("*.sbatch")), "no sbatch script rendered"


def _bf16_copy(src: Path, dst: Path) -> Path:
    """The mini teacher saved in bf16 (a bf16 checkpoint converts to a bf16 megatron checkpoint exactly, so
    ``verify`` compares the same weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            (dst / extra).write_text((src / extra).read_text())
    return dst


def _eval_sets(tmp_path: Path) -> list[Path]:
    """Local files in the schemas of the hub sets the README names (MATH-500, AIME 2024, AIME 2025)."""
    from tests.unit.data.s2d_data_rows import aime_row, math500_row, write_jsonl

    qs = [("What is 2 + 3?", "5"), ("What is 7 + 1?", "8"), ("What is 4 + 4?", "8")]
    return [write_jsonl(tmp_path / "math500.jsonl", [math500_row(i, q, a) for i, (q, a) in enumerate(qs)]),
            write_jsonl(tmp_path / "aime2024.jsonl", [aime_row(i, q, a) for i, (q, a) in enumerate(qs)]),
            write_jsonl(tmp_path / "aime2025.jsonl", [aime_row(i, q, a) for i, (q, a) in enumerate(qs)])]


def test_convert_verify_export_eval_through_console_script(mini_world, tmp_path):
    from safetensors.torch import load_file

    hf = _bf16_copy(mini_world / "teacher", tmp_path / "Qwen3-mini")
    ckpt, release = tmp_path / "ckpt" / "qwen3-mini", tmp_path / "release"

    # s2d convert hf-to-megatron --hf Qwen3-8B --out ckpt/qwen3-8b --tp 2 --pp 1 --dtype bf16
    proc = s2d("convert", "hf-to-megatron", "--hf", hf, "--out", ckpt, "--tp", "2", "--pp", "1", "--dtype", "bf16")
    assert "wrote" in proc.stdout and (ckpt / "s2d_model.json").is_file()
    assert json.loads((ckpt / "s2d_model.json").read_text())["dtype"] == "bf16"

    # s2d convert verify --hf Qwen3-8B --megatron ckpt/qwen3-8b --tp 2   (relaunches itself on 2 processes)
    proc = s2d("convert", "verify", "--hf", hf, "--megatron", ckpt, "--tp", "2")
    assert "verify OK" in proc.stdout, proc.stdout[-2000:]

    # s2d convert megatron-to-hf --megatron <checkpoint> --out release/
    s2d("convert", "megatron-to-hf", "--megatron", ckpt, "--out", release)
    exported = {}
    for f in sorted(release.glob("*.safetensors")):
        exported.update(load_file(f))
    original = {}
    for f in sorted(hf.glob("*.safetensors")):
        original.update(load_file(f))
    assert exported.keys() == original.keys()
    assert all(exported[k].equal(original[k]) for k in original), "bf16 round trip is not bit-exact"

    # s2d eval --model release/ --data math500 --data aime2024 --data aime2025 --k 16   (local files, small k)
    math500, aime24, aime25 = _eval_sets(tmp_path)
    out = tmp_path / "eval.json"
    proc = s2d("eval", "--model", release, "--data", math500, "--data", aime24, "--data", aime25, "--k", "2",
               "--max-new-tokens", "8", "--out", out)
    assert "| data | grader | avg@2 |" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]  # quiet by default, like `s2d run`
    res = json.loads(out.read_text())["results"]
    assert set(res) == {str(math500), str(aime24), str(aime25)}
    assert all(r["n_problems"] == 3 and r["k"] == 2 for r in res.values())

    # bad input is a clear error with exit code 2, naming the file, and nothing is written
    bad = s2d("convert", "hf-to-megatron", "--hf", tmp_path / "missing", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "missing" in bad.stderr and not (tmp_path / "x").exists()


def test_eval_grader_both_through_console_script(mini_world, tmp_path):
    """``s2d eval --grader both``: every sample graded by math-verify and by lm-eval's Hendrycks last box; the table
    has a row per grader, the agreement line is printed, and the JSON records the graders and their agreement."""
    math500 = _eval_sets(tmp_path)[0]
    out = tmp_path / "eval.json"
    proc = s2d("eval", "--model", mini_world / "teacher", "--data", math500, "--k", "2", "--max-new-tokens", "8",
               "--grader", "both", "--out", out)
    assert f"| {math500} | math_verify |" in proc.stdout and f"| {math500} | hendrycks_boxed |" in proc.stdout
    assert re.search(rf"{re.escape(str(math500))}: graders agree on [0-9.]+% of 6 samples \(correct only by "
                     r"math_verify: \d+, only by hendrycks_boxed: \d+\)", proc.stdout), proc.stdout[-2000:]
    r = json.loads(out.read_text())["results"][str(math500)]
    assert r["grader"] == "math_verify" and set(r["by_grader"]) == {"math_verify", "hendrycks_boxed"}
    a = r["agreement"]
    only = a["correct_only_by"]
    assert a["n_samples"] == 6 and a["agreement_rate"] == pytest.approx(1 - (only["math_verify"] + only[
        "hendrycks_boxed"]) / 6)
    # the two graders' avg@k differ by exactly the disagreements
    diff = (r["by_grader"]["math_verify"]["avg"] - r["by_grader"]["hendrycks_boxed"]["avg"]) * 6
    assert diff == pytest.approx(only["math_verify"] - only["hendrycks_boxed"])
    # the plan's grader alone: recorded, one row
    proc = s2d("eval", "--model", mini_world / "teacher", "--data", math500, "--k", "2", "--max-new-tokens", "8",
               "--grader", "hendrycks_boxed", "--out", out)
    assert "agree" not in proc.stdout and json.loads(out.read_text())["results"][str(math500)]["grader"] == \
        "hendrycks_boxed"


def test_readme_plan_override_syntax_is_accepted(tmp_path):
    """``s2d run PLAN.yaml stages.opd.steps=200 --stages opd,student_rl``: overrides after the plan and options
    after overrides parse, and a stage name that is not in the plan is refused by name (exit 2)."""
    plan = yaml.safe_load((ROOT / "run_configs" / "toy_cpu.yaml").read_text())
    names = [s["name"] for s in plan["stages"]]
    assert "opd" in names and "student_rl" in names
    proc = s2d("run", "run_configs/toy_cpu.yaml", "stages.nope.steps=200", "--stages", "opd,student_rl",
               "--dry-run", f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "no stage named 'nope'" in proc.stderr
