"""``teacher_sft`` through the real CLI: SFT on reference solutions (mini world: a pool whose rows carry solutions)
trains, counts its labels and feeds a forward-KL bridge; a pool without solutions is refused before anything runs;
rejection-sampling SFT on the shipped toy world (whose teacher solves some problems) trains on the samples it kept,
resumes bit-identically after a SIGKILL, and samples its rounds on a generation rank of its own
(``rollout.placement: separate``) to the same final weights."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.functional.conftest import ROOT, mini_plan, s2d, s2d_console_script, write_plan
from tests.functional.test_pipeline_cli import _final_weights

pytestmark = pytest.mark.functional


def _metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def _lineage(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / stage / "lineage.json").read_text())


def _solutions_pool(world: Path, dest: Path) -> Path:
    """The mini world's first 16 problems with a worked solution each (the toy's response format)."""
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:16]]
    for r in rows:
        a, b = r["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")
        r["solution"] = f"{a} + {b} = {r['answer']}. The answer is \\boxed{{{r['answer']}}}."
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def test_sft_on_solutions_trains_counts_its_labels_and_feeds_a_bridge(mini_world, tmp_path):
    stages = [{"name": "teacher_sft", "kind": "teacher_sft", "split": "1H", "steps": 4, "prompts_per_step": 8,
               "sft": {"source": "solutions"}, "rollout": {"engine": "megatron", "max_new_tokens": 40}},
              {"name": "fkl", "kind": "fkl_warmup", "teacher": "teacher_sft", "split": "1H", "steps": 1,
               "warmup": {"mode": "sampled", "teacher_samples_per_prompt": 1}}]
    run = tmp_path / "run"
    plan = mini_plan(mini_world, run, stages, eval={"k": 1, "max_new_tokens": 8, "include_base": False})
    plan["data"]["pool"] = str(_solutions_pool(mini_world, tmp_path / "pool.jsonl"))
    plan["stage_defaults"]["eval"] = False
    s2d("run", write_plan(tmp_path / "plan.yaml", plan))
    m = _metrics(run, "teacher_sft")
    # the split's 8 problems every step (prompts_per_step = the split): the NLL of their solutions falls
    nll = [x["nll_mean"] for x in m]
    assert [x["trained_seqs"] for x in m] == [8.0] * 4 and all(b < a for a, b in zip(nll, nll[1:])), nll
    assert nll[-1] < 0.9 * nll[0], nll
    lin = _lineage(run, "teacher_sft")
    assert lin["ledger"]["labels_consumed"] == 8 and lin["labels_used_by_lineage"] == ["1H"]
    assert lin["ledger"]["generated_tokens"] == 0  # nothing sampled
    base = _final_weights(run / "models" / "teacher_base", tmp_path / "base_hf")
    tuned = _final_weights(Path(lin["final_checkpoint"]), tmp_path / "sft_hf")
    assert base.keys() == tuned.keys() and any(not torch.equal(base[k], tuned[k]) for k in base)
    # the SFT teacher feeds a bridge: its final checkpoint generates the warmup's samples, and its labels reach the
    # student's lineage (the reuse check sees them)
    fkl = _lineage(run, "fkl")
    assert fkl["parents"]["teacher"] == "teacher_sft"
    assert fkl["parents"]["teacher_checkpoint"] == lin["final_checkpoint"]
    assert fkl["labels_used_by_lineage"] == ["1H"]


def test_pool_without_solutions_is_refused_before_anything_runs(mini_world, tmp_path):
    run = tmp_path / "run"
    stages = [{"name": "teacher_sft", "kind": "teacher_sft", "split": "1H", "sft": {"source": "solutions"}}]
    plan = write_plan(tmp_path / "plan.yaml", mini_plan(mini_world, run, stages))
    proc = s2d("run", plan, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    pool = str(mini_world / "train.jsonl")
    assert f"data.pool = {pool!r} carries no reference solutions" in proc.stderr, proc.stderr
    assert "stages.teacher_sft (sft.source: solutions)" in proc.stderr and "sft.source: rejection" in proc.stderr
    assert not (run / "models").exists()  # refused before the base models were imported


def _toy_rejection_plan(run: Path) -> dict:
    return {
        "name": "toy_rft", "run_dir": str(run), "seed": 1234, "toy_world": True,
        "models": {"teacher": {"dtype": "fp32"}, "student": {"dtype": "fp32"}},
        "data": {"pool": "toy-train", "pool_limit": 8, "max_prompt_tokens": 128,
                 "eval": [{"name": "toy-test", "source": "toy-test", "limit": 2}]},
        "eval": {"k": 1, "max_new_tokens": 64, "include_base": False},
        "stages": [{"name": "teacher_sft", "kind": "teacher_sft", "split": "1H", "steps": 4, "prompts_per_step": 4,
                    "save_every": 1, "eval": False, "micro_batch_tokens": 4096,
                    "sft": {"source": "rejection", "samples_per_prompt": 4, "rounds": 2},
                    "rollout": {"engine": "megatron", "max_new_tokens": 64}, "optim": {"lr": 1.0e-4}}],
    }


def test_rejection_sft_trains_on_kept_samples_and_resumes_bit_identically(tmp_path):
    """Two runs: one uninterrupted, its rounds sampled on a generation rank of its own (``rollout.placement:
    separate``, k = 0) next to the one trainer; one colocated, SIGKILLed after its first checkpoint and resumed. They
    end bit-identical: the resume reproduces the uninterrupted run, and so does sampling on ranks of its own (one
    run for both claims: a colocated straight run would be the third)."""
    results = {}
    for mode in ("separate", "crashed"):
        run = tmp_path / mode
        d = _toy_rejection_plan(run)
        if mode == "separate":
            d["launch"] = {"procs_per_node": 2}
            d["stages"][0]["rollout"].update(placement="separate", generation_ranks=1)
        plan = write_plan(tmp_path / f"{mode}.yaml", d)
        if mode == "crashed":
            proc = subprocess.Popen([s2d_console_script(), "run", str(plan)], cwd=ROOT, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            latest = run / "stages" / "teacher_sft" / "checkpoints" / "latest"
            deadline = time.time() + 600
            while time.time() < deadline and not latest.is_file():
                time.sleep(0.2)
            assert latest.is_file(), "no checkpoint appeared"
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no chance to save anything more
            proc.wait()
            assert not (run / "stages" / "teacher_sft" / "COMPLETE").exists()
        out = s2d("run", plan).stdout
        if mode == "separate":
            assert "rollouts on 1 generation ranks of their own (megatron sampler), 1 ranks train" in out, out
        lin = _lineage(run, "teacher_sft")
        assert Path(lin["final_checkpoint"]).name == "step_000004"
        results[mode] = (_final_weights(Path(lin["final_checkpoint"]), tmp_path / f"{mode}_hf"), lin,
                         _metrics(run, "teacher_sft"))
    weights, lin, m = results["separate"]
    # every problem of the split was graded (round 0); each round kept some samples and trained on them; within a
    # round every step trains on the same kept set (4 prompts a step >= the split's 4), so its NLL falls (round 1 sampled
    # with the weights of round 0's two updates, pushed before it: the generators check the version they were sent)
    assert lin["ledger"]["labels_consumed"] == 4 and lin["ledger"]["generated_tokens"] > 0
    assert all(0 < x["sft_kept_frac"] <= 1 and x["trained_seqs"] > 0 for x in m)
    assert m[1]["nll_mean"] < m[0]["nll_mean"] and m[3]["nll_mean"] < m[2]["nll_mean"], m
    base = _final_weights(tmp_path / "separate" / "models" / "teacher_base", tmp_path / "base_hf")
    assert any(not torch.equal(base[k], weights[k]) for k in base)
    crashed, crashed_lin, crashed_m = results["crashed"]
    assert weights.keys() == crashed.keys()
    for k, v in weights.items():
        assert torch.equal(v, crashed[k]), k
    assert crashed_lin["ledger"]["generated_tokens"] == lin["ledger"]["generated_tokens"]
    assert [(x["nll_mean"], x["sft_kept_frac"]) for x in crashed_m] == \
        [(x["nll_mean"], x["sft_kept_frac"]) for x in m]
