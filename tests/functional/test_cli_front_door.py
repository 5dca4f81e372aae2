"""The ``s2d`` front door, typed as a user types it (the installed console script, in a subprocess), on synthetic run
folders and argument errors: no stage runs, so these take seconds.

* ``--version``; ``--help`` of every command shows the defaults and an example;
* ``s2d run PLAN --print-plan``: the resolved plan as YAML, nothing written; an unknown key names the closest one;
* ``s2d status RUN``: each job's state, exit code and log, and the run folder untouched;
* ``s2d report RUN --out DIR`` for a run it cannot write into; a damaged file of the run is named (exit 2);
* OS errors on the run folder (a file where it should be) are exit-2 messages naming the path;
* ``s2d eval`` refuses a bad ``--out``, a malformed row under ``--strict`` and a budget past the context before it
  loads a model.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import yaml

from megatron_s2d.config import load_plan, to_dict
from tests.functional.conftest import ROOT, s2d
from tests.unit.run._run_folder import snapshot, synthetic_run

pytestmark = pytest.mark.functional


def test_version():
    assert s2d("--version").stdout.strip() == f"s2d {version('megatron-s2d')}"


@pytest.mark.parametrize("command, default", [
    ("run", "(default: the plan's launch.executor)"), ("eval", "(default: 16)"),
    ("report", "(default: RUN_DIR/report)"),
    ("status", None), ("toy build", "(default: 0)"), ("convert hf-to-megatron", "(default: 1)"),
    ("convert megatron-to-hf", "(default: 5GB)"), ("convert verify", "(default: 0.0001)"),
])
def test_every_help_shows_defaults_and_an_example(command, default):
    out = s2d(*command.split(), "--help").stdout
    assert f"example:\n  s2d {command} " in out, out
    if default:
        assert default in " ".join(out.split()), out


def test_print_plan_prints_the_resolved_plan_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = s2d("run", "run_configs/toy_cpu.yaml", "stages.opd.steps=3", f"run_dir={run_dir}", "--print-plan")
    printed = yaml.safe_load(proc.stdout)
    assert printed["run_dir"] == str(run_dir)
    assert {s["name"]: s for s in printed["stages"]}["opd"]["steps"] == 3
    assert "stage_defaults" not in printed and "base" not in printed  # merged in: every stage states its settings
    (tmp_path / "printed.yaml").write_text(proc.stdout)  # a plan of its own: it loads to the same plan
    assert to_dict(load_plan(tmp_path / "printed.yaml")) == printed
    assert to_dict(load_plan(ROOT / "run_configs/toy_cpu.yaml", ["stages.opd.steps=3", f"run_dir={run_dir}"])) \
        == printed
    assert not run_dir.exists()

    bad = s2d("run", "run_configs/toy_cpu.yaml", "stages.opd.stepz=3", "--print-plan", check=False)
    assert bad.returncode == 2 and "unknown key(s) ['stepz'] (did you mean 'steps'?)" in bad.stderr


def test_status_reads_the_run_folder_only(tmp_path):
    run = tmp_path / "run"
    logs = synthetic_run(run)
    before = snapshot(run)
    out = s2d("status", run).stdout.splitlines()
    assert out[0] == f"run {run} (plan 'synth', executor local)"
    rows = {line.split()[0]: line.split(None, 2)[2] for line in out[1:-1]}
    assert rows["base_eval"] == "complete" and rows["teacher_rl"] == "complete"
    assert rows["fkl"] == f"failed at step 2 of 3: exit code 1: the log's traceback says why; log: {logs['fkl']}"
    assert rows["opd"].startswith("stopped at step 3 of 5 (checkpoint at step 2): exit code 75")
    assert rows["student_rl"].startswith("running at step 1 of 6")  # its lock names this (live) test process
    assert rows["extra"] == "not started"
    assert out[-1] == "2/7 complete"
    assert snapshot(run) == before

    missing = s2d("status", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and "no plan.resolved.yaml there" in missing.stderr


def test_report_of_a_run_it_cannot_write_and_of_a_damaged_one(tmp_path):
    run = tmp_path / "run"
    synthetic_run(run)
    (run / "report").write_text("")  # as root this is how a run folder is unwritable: a file where report/ goes
    before = snapshot(run)
    bad = s2d("report", run, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith(f"s2d: error: {run / 'report'}: cannot write the report")
    assert "pass --out DIR" in bad.stderr and "Traceback" not in bad.stderr
    proc = s2d("report", run, "--out", tmp_path / "elsewhere")
    assert "| teacher_rl | teacher_rl |" in proc.stdout and (tmp_path / "elsewhere" / "report.md").is_file()
    assert snapshot(run) == before

    lineage = run / "stages" / "teacher_rl" / "lineage.json"
    lineage.write_text(lineage.read_text()[:40])  # cut short, as a full disk leaves it
    damaged = s2d("report", run, "--out", tmp_path / "elsewhere", check=False)
    assert damaged.returncode == 2 and damaged.stderr.startswith(f"s2d: error: {lineage}: damaged JSON (")
    assert "Traceback" not in damaged.stderr


@pytest.mark.parametrize("where, reason", [
    ("file", "File exists (a file is there where a folder should be"),
    ("file/run", "Not a directory (a part of this path is a file where a folder should be"),
])
def test_os_errors_on_the_run_folder_are_named(tmp_path, where, reason):
    (tmp_path / "file").write_text("not a folder")
    proc = s2d("run", "run_configs/toy_cpu.yaml", f"run_dir={tmp_path / where}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"s2d: error: {tmp_path / 'file'}" in proc.stderr and reason in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_eval_refuses_bad_arguments_before_loading_a_model(mini_world, tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "What is 1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "What is 2 + 2?"}) + "\n")
    # --out is checked first: the model does not even exist
    for out, says in [(tmp_path, "is a folder"), (tmp_path / "no" / "e.json", "does not exist: create it")]:
        proc = s2d("eval", "--model", tmp_path / "no-model", "--data", data, "--out", out, check=False)
        assert proc.returncode == 2 and f"--out {out}: " in proc.stderr and says in proc.stderr, proc.stderr
    model = mini_world / "teacher"
    # --strict: the malformed row is refused by file and row (by default it is skipped and reported)
    proc = s2d("eval", "--model", model, "--data", data, "--strict", check=False)
    assert proc.returncode == 2 and f"{data}:2" in proc.stderr and "missing 'answer'" in proc.stderr, proc.stderr
    # a budget past the context is refused, naming the longest prompt; the data loaded (skipping row 2) to get there
    proc = s2d("eval", "--model", model, "--data", data, "--max-new-tokens", "100000", check=False)
    assert proc.returncode == 2 and "--max-new-tokens = 100000: the longest prompt (" in proc.stderr, proc.stderr
    assert "skipped 1 malformed row(s)" in proc.stdout
    # --schema: columns no schema is detected from, read as the s2d schema (ids optional there: row numbers)
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    proc = s2d("eval", "--model", model, "--data", bare, "--max-new-tokens", "100000", check=False)
    assert proc.returncode == 2 and "cannot detect the schema" in proc.stderr
    proc = s2d("eval", "--model", model, "--data", bare, "--schema", "s2d", "--max-new-tokens", "100000", check=False)
    assert proc.returncode == 2 and "--max-new-tokens = 100000: the longest prompt" in proc.stderr, proc.stderr
