"""The real CLI on a shortened plan: every stage through the NeMo-Run local executor, lineage, report, re-run
skipping, resume after a crash mid-stage (same final weights as an uninterrupted run), and bad plans refused
before anything runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.functional.conftest import ROOT, mini_plan, s2d, s2d_console_script, write_plan

pytestmark = pytest.mark.functional


def test_plan_end_to_end_lineage_report_and_rerun(mini_world, tmp_path):
    stages = [
        {"name": "teacher_rl", "kind": "teacher_rl", "split": "1H"},
        {"name": "fkl", "kind": "fkl_warmup", "teacher": "teacher_rl", "split": "1H",
         "warmup": {"topk": 4, "teacher_samples_per_prompt": 2}},
        {"name": "opd", "kind": "opd", "init": "fkl", "teacher": "teacher_rl", "split": "1H"},
        {"name": "student_rl", "kind": "student_rl", "init": "opd", "split": "2H"},
        {"name": "cold_grpo", "kind": "student_rl", "split": "2H", "control": "cold_grpo"},
    ]
    run = tmp_path / "run"
    plan = write_plan(tmp_path / "plan.yaml", mini_plan(mini_world, run, stages, eval={"k": 2, "max_new_tokens": 8,
                                                                                         "include_base": True}))
    proc = s2d("run", plan, "stage_defaults.steps=2")
    for name in ("base_eval", "teacher_rl", "fkl", "opd", "student_rl", "cold_grpo"):
        assert (run / "stages" / name / "COMPLETE").is_file(), name
    lin = json.loads((run / "stages" / "student_rl" / "lineage.json").read_text())
    assert lin["parents"]["init"] == "opd" and set(lin["ancestors"]) == {"opd", "fkl", "teacher_rl"}
    assert lin["labels_used_by_lineage"] == ["1H", "2H"]
    splits = json.loads((run / "data" / "splits.json").read_text())
    assert lin["split_manifests"]["2H"]["content_hash"] == splits["2H"]["content_hash"]
    assert lin["ledger"]["labels_consumed"] == 4 and lin["ledger"]["generated_tokens"] > 0
    assert lin["ancestor_ledgers"]["opd"]["teacher_scored_tokens"] > 0
    assert lin["ancestor_ledgers"]["opd"]["labels_consumed"] == 0
    assert Path(lin["final_checkpoint"]).is_dir() and len(lin["config_hash"]) == 16
    metrics = [json.loads(l) for l in (run / "stages" / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("reverse_kl_mean" in m for m in metrics)
    report = (run / "report" / "report.md").read_text()
    for route in ("teacher_base", "student_base", "teacher_rl", "student_rl", "cold_grpo"):
        assert f"| {route} |" in report
    assert (run / "report" / "training_curves.png").stat().st_size > 1000
    assert (run / "report" / "accuracy_per_route.png").stat().st_size > 1000
    # every figure in the report is the run's own: eval.json of a stage matches its table cell
    ev = json.loads((run / "stages" / "cold_grpo" / "eval.json").read_text())["results"]["mini-test"]
    assert f"{100 * ev['avg']:.1f} ± {100 * ev['stderr']:.1f}" in report
    # a second run, in the README's form (overrides, a subset): a completed stage is not silently kept under
    # settings that would change it (it used to print "nothing to run"); a setting that changes no result passes
    refused = s2d("run", plan, "stages.opd.steps=200", "--stages", "opd,student_rl", check=False)
    assert refused.returncode == 2 and "stages.opd.steps: 2 -> 200" in refused.stderr, refused.stderr
    t0 = time.perf_counter()
    again = s2d("run", plan, "stages.opd.save_every=1", "--stages", "opd,student_rl")
    assert "job opd" not in again.stdout and time.perf_counter() - t0 < 120
    # s2d report RUN: the same table from the run's files
    rep = s2d("report", run)
    assert "| cold_grpo |" in rep.stdout and f"{100 * ev['avg']:.1f} ± {100 * ev['stderr']:.1f}" in rep.stdout


def _final_weights(ckpt: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from megatron_s2d.checkpoint.megatron_to_hf import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_resume_after_crash_gives_the_same_final_checkpoint(mini_world, tmp_path):
    stages = [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "steps": 3, "save_every": 1,
               "eval": False}]
    results = {}
    for mode in ("straight", "crashed"):
        run = tmp_path / mode
        plan = write_plan(tmp_path / f"{mode}.yaml",
                          mini_plan(mini_world, run, stages, eval={"k": 2, "include_base": False}))
        if mode == "crashed":
            proc = subprocess.Popen([s2d_console_script(), "run", str(plan)], cwd=ROOT,
                                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            latest = run / "stages" / "teacher_rl" / "checkpoints" / "latest"
            deadline = time.time() + 600
            while time.time() < deadline and not latest.is_file():
                time.sleep(0.2)
            assert latest.is_file(), "no checkpoint appeared"
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no chance to save anything more
            proc.wait()
            assert not (run / "stages" / "teacher_rl" / "COMPLETE").exists()
        s2d("run", plan)
        final = Path(json.loads((run / "stages" / "teacher_rl" / "lineage.json").read_text())["final_checkpoint"])
        assert final.name == "step_000003"
        results[mode] = _final_weights(final, tmp_path / f"{mode}_hf")
    assert results["straight"].keys() == results["crashed"].keys()
    for k, v in results["straight"].items():
        assert torch.equal(v, results["crashed"][k]), k


def _mismatched_student(world: Path, dest: Path) -> Path:
    shutil.copytree(world / "student", dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


def test_bad_plans_fail_before_anything_runs(mini_world, tmp_path):
    bad_student = _mismatched_student(mini_world, tmp_path / "bad_student")
    cases = [
        ("tokenizer", {"models": {"teacher": {"hf": str(mini_world / "teacher")}, "student": {"hf": str(bad_student)}}},
         [], "tokenizer mismatch"),
        ("layout", {"launch": {"procs_per_node": 3}}, ["models.teacher.tp=3", "models.student.tp=3"],
         "is not divisible by tensor_parallel = 3"),
        ("unknown_stage", {}, ["--stages", "nope"], "nope"),
        ("cycle", {"stages": [{"name": "a", "kind": "student_rl", "init": "b", "split": "1H"},
                              {"name": "b", "kind": "student_rl", "init": "a", "split": "2H"}]}, [], "cycle"),
        ("label_reuse", {"stages": [{"name": "t", "kind": "teacher_rl", "split": "1H"},
                                    {"name": "o", "kind": "opd", "teacher": "t", "split": "1H"},
                                    {"name": "s", "kind": "student_rl", "init": "o", "split": "1H"}]}, [],
         "reuse the labels"),
    ]
    for name, change, extra, message in cases:
        run = tmp_path / f"run_{name}"
        plan = mini_plan(mini_world, run)
        plan.update(change)
        path = write_plan(tmp_path / f"{name}.yaml", plan)
        proc = s2d("run", path, *extra, check=False, timeout=300)
        assert proc.returncode == 2, (name, proc.stdout[-2000:], proc.stderr[-2000:])
        assert message in proc.stderr, (name, proc.stderr[-2000:])
        assert not (run / "stages").exists(), name


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(mini_world, tmp_path):
    """A truncated .distcp in the newest checkpoint of an unfinished stage (and, second round, a missing file):
    the re-run names the file and resumes from the previous complete checkpoint instead of dying in an EOFError.
    The stage is made unfinished by taking away its end (COMPLETE, lineage, the last checkpoint), as a stage stopped
    after step 3 would be; the plan stays the same (a changed one is refused: test_run_folder_drift.py)."""
    import shutil

    stages = [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "steps": 4, "save_every": 1,
               "keep_checkpoints": 4, "eval": False}]
    run = tmp_path / "run"
    plan = write_plan(tmp_path / "plan.yaml", mini_plan(mini_world, run, stages, eval={"k": 2, "include_base": False}))
    s2d("run", plan)
    ckpts = run / "stages" / "teacher_rl" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [f"step_{k:06d}" for k in (1, 2, 3, 4)]
    for damage in ("truncate", "delete"):
        for f in ("COMPLETE", "lineage.json"):
            (run / "stages" / "teacher_rl" / f).unlink()
        shutil.rmtree(ckpts / "step_000004")
        (ckpts / "latest").write_text("step_000003\n")
        newest = ckpts / "step_000003"
        victim = sorted((newest / "model").glob("*.distcp"))[0]
        if damage == "truncate":
            victim.write_bytes(victim.read_bytes()[:100])
        else:
            victim.unlink()
        proc = s2d("run", plan)
        assert f"checkpoint {newest} is damaged" in proc.stdout and victim.name in proc.stdout
        assert f"resumed from {ckpts / 'step_000002'} at step 2" in proc.stdout
        final = Path(json.loads((run / "stages" / "teacher_rl" / "lineage.json").read_text())["final_checkpoint"])
        assert final.name == "step_000004"


def test_second_launcher_on_the_same_run_folder_is_refused(mini_world, tmp_path):
    stages = [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "steps": 50, "eval": False}]
    run = tmp_path / "run"
    plan = write_plan(tmp_path / "plan.yaml", mini_plan(mini_world, run, stages, eval={"k": 2, "include_base": False}))
    first = subprocess.Popen([s2d_console_script(), "run", str(plan)], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "LOCK").is_file() and (run / "LOCK").read_text()):
            time.sleep(0.2)
        second = s2d("run", plan, check=False)
        assert second.returncode == 2
        assert f"is in use by pid {first.pid}" in second.stderr and "run folder" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
