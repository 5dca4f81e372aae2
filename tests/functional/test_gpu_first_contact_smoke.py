"""benchmarks/gpu_first_contact.sh, the script a GPU run executes first, in its CPU mode (``--cpu-smoke``): every
section prints its figures or an explicit SKIP with the reason, the toy stage is stopped by SIGTERM after its first
checkpoint and resumes to completion, the memory rehearsal gives the grad buffers back and restores the weights
bit-identically, and the run exits 0. Without a GPU, the GPU mode must fail each section it runs and exit non-zero
(a failing section does not stop the next one)."""

import os
import re
import subprocess
import sys

import pytest

from tests.functional.conftest import ROOT

pytestmark = [pytest.mark.functional]

SECTIONS = ["toy_stage", "fp8_train", "fp8_sampler", "sampler_speed", "memory", "packing", "gpu_tests"]
SKIPPED = {"gpu_tests": "need CUDA", "fp8_train": "FP8 needs CUDA + Transformer Engine",
           "fp8_sampler": "FP8 needs CUDA + Transformer Engine"}


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, S2D_PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_first_contact.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _figures(out: str, section: str) -> dict[str, str]:
    """``[section] name: value`` lines as {name: value}."""
    return {m.group(1): m.group(2) for m in re.finditer(rf"^\[{section}\] ([^:\n]+): (.*)$", out, re.M)}


def test_cpu_smoke_runs_every_section(tmp_path):
    proc = _run("--cpu-smoke", "--workdir", str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    assert "7 of 7 sections ran without failure" in out, out[-3000:]
    for name in SECTIONS:
        status = re.search(rf"^\[{name}\] (OK|SKIP \((.+)\))", out, re.M)
        assert status, f"{name}: no status line\n{out[-3000:]}"
        if name in SKIPPED:
            assert status.group(1).startswith("SKIP") and SKIPPED[name] in status.group(2), status.group(0)
        else:
            assert status.group(1) == "OK", status.group(0)
            assert _figures(out, name), f"{name}: no figures"

    toy = _figures(out, "toy_stage")
    assert toy["first_run_exit_code"] == "75" and toy["first_run_stopped_at_step"] in ("1", "2"), toy
    assert toy["resume_exit_code"] == "0" and toy["resumed_from_step"] == toy["first_run_stopped_at_step"], toy
    assert toy["final_step"] == "3 of 3" and toy["metrics_lines"] == "3", toy
    for label in ("llama", "qk_norm"):  # fp32 on CPU: packed and padded agree to rounding
        pack = _figures(out, "packing")
        assert float(pack[f"{label} logprob_abs_diff_max"]) < 1e-4 and float(pack[f"{label} top3_ids_agree"]) == 1
    speed = _figures(out, "sampler_speed")
    assert sum(k.endswith("ms_per_decode_step") for k in speed) == 4, speed
    mem = _figures(out, "memory")
    assert mem["weights_bit_identical_after_restore"] == "True"
    assert int(mem["offload released_grad_buffer_bytes"].split()[0]) > 0
    assert mem["after_offload grad_buffers"] == "0 GiB"
    assert "second logprobs+train_step" in mem
    sampler = _figures(out, "fp8_sampler")  # ran without FP8: the sampler follows the update exactly
    assert float(sampler["update_moved_logprobs_mean"]) > 0.05
    assert float(sampler["sampler_vs_policy_logprobs max_abs_diff"]) < 1e-3


def test_gpu_mode_without_a_gpu_fails_each_section_and_goes_on(tmp_path):
    proc = _run("--sections", "gpu_tests,fp8_train", "--workdir", str(tmp_path), timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert re.search(r"^\[gpu_tests\] FAIL: RuntimeError: no CUDA device", out, re.M), out
    assert re.search(r"^\[fp8_train\] FAIL: RuntimeError: no CUDA device", out, re.M), out
    assert "[summary] gpu_tests: FAIL" in out and "[summary] fp8_train: FAIL" in out
    assert "FAILED: gpu_tests, fp8_train" in out
