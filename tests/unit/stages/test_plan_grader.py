"""A plan's ``grader``: it loads (``math_verify`` by default, ``hendrycks_boxed`` on request, anything else refused at
load naming the field), the stage reward grades with it (``steps.sparse_rewards`` on real toy-tokenizer samples), the
plan's evaluator carries it, and it is in the fingerprint of the stages whose reward it is (a change is refused on
resume, naming ``grader``), not of a stage that reads no labels."""

from pathlib import Path

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.config.fingerprint import fingerprint_digest, stage_fingerprint
from megatron_s2d.errors import S2DError
from megatron_s2d.rollout.base import Sample
from megatron_s2d.stages.provenance import Recorded, check_drift
from megatron_s2d.stages.steps import sparse_rewards

ROOT = Path(__file__).resolve().parents[3]
TOY = ROOT / "run_configs" / "toy_cpu.yaml"
WORLD = ROOT / "megatron_s2d" / "toy" / "world"


def test_default_grader_is_math_verify():
    assert load_plan(TOY).grader == "math_verify"


def test_unknown_grader_is_refused_at_load():
    with pytest.raises(S2DError, match=r"grader: 'sympy' is not one of \['math_verify', 'hendrycks_boxed'\]"):
        load_plan(TOY, ["grader=sympy"])


def _samples(tokenizer, responses):
    out = []
    for text in responses:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(Sample(prompt_ids=[1], response_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
    return out


def test_sparse_rewards_grade_with_the_plans_grader():
    """Responses where the graders differ: an unboxed answer (math-verify reads it, the last-box grader does not)
    and two boxes (math-verify reads both as a set, the last-box grader the last one)."""
    plan = load_plan(TOY, ["grader=hendrycks_boxed"])
    assert plan.grader == "hendrycks_boxed"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(WORLD / "tokenizer"))  # the toy world's (shipped)

    def decode(ids):  # as ModelAssets.decode
        return tokenizer.decode(ids, skip_special_tokens=True)

    responses = ["so \\boxed{5}.", "The answer is 5.", "\\boxed{3} no, \\boxed{5}", "\\boxed{x = 6}"]
    samples = _samples(tokenizer, responses)
    answers = ["5", "6"]  # two prompts, n = 2 samples each
    hb, _ = sparse_rewards(samples, answers, 2, decode, grader=plan.grader)
    assert hb.tolist() == [1.0, 0.0, 0.0, 1.0]
    mv, metrics = sparse_rewards(samples, answers, 2, decode, grader=load_plan(TOY).grader)
    assert mv.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert metrics["reward_timeouts"] == 0.0


def test_plan_evaluator_carries_the_grader():
    from megatron_s2d.stages.job import plan_evaluator

    ev = plan_evaluator(load_plan(TOY, ["grader=hendrycks_boxed"]), log=lambda m: None)
    assert ev.graders == ("hendrycks_boxed",) and ev.sets


def test_grader_is_in_the_fingerprint_of_label_consuming_stages_only():
    mv, hb = load_plan(TOY), load_plan(TOY, ["grader=hendrycks_boxed"])
    stages = {s.name: s for s in mv.stages}
    hb_stages = {s.name: s for s in hb.stages}
    grpo = next(n for n, s in stages.items() if s.kind in ("teacher_rl", "student_rl"))
    warmup = next(n for n, s in stages.items() if s.kind == "fkl_warmup")
    a, b = stage_fingerprint(mv, stages[grpo]), stage_fingerprint(hb, hb_stages[grpo])
    assert (a["grader"], b["grader"]) == ("math_verify", "hendrycks_boxed")
    assert fingerprint_digest(a) != fingerprint_digest(b)
    assert "grader" not in stage_fingerprint(hb, hb_stages[warmup])
    assert stage_fingerprint(mv, stages[warmup]) == stage_fingerprint(hb, hb_stages[warmup])
    # resuming a GRPO stage under the other grader is refused, naming the plan-level field
    with pytest.raises(S2DError, match=r"grader: 'math_verify' -> 'hendrycks_boxed'"):
        check_drift(hb, hb_stages[grpo], Recorded(a, "checkpoint", complete=False))
