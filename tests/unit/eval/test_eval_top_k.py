"""``eval.top_k``: loaded from the plan (a negative value refused at load, naming the field), carried by the plan's
evaluator into the engine's SamplingParams of every eval generation, and recorded in each set's result."""

from pathlib import Path

import pytest

from megatron_s2d.config import load_plan
from megatron_s2d.errors import S2DError
from megatron_s2d.rollout.base import GenerationResult, Sample

ROOT = Path(__file__).resolve().parents[3]
TOY = ROOT / "run_configs" / "toy_cpu.yaml"
WORLD = ROOT / "megatron_s2d" / "toy" / "world"


class RecordingEngine:
    """Answers every prompt with a fixed boxed response and records the sampling parameters it was asked for (the
    engines' own top-k sampling is tested in tests/unit/rollout)."""

    def __init__(self, tokenizer):
        self.params, self.ids = [], tokenizer.encode("\\boxed{5}", add_special_tokens=False)

    def generate(self, prompts, params):
        self.params.append(params)
        return GenerationResult([[Sample(prompt_ids=p, response_ids=self.ids, logprobs=[0.0] * len(self.ids),
                                         finish_reason="stop") for _ in range(params.n)] for p in prompts])


def test_default_is_off():
    assert load_plan(TOY).eval.top_k == 0


def test_negative_top_k_is_refused_at_load():
    with pytest.raises(S2DError, match=r"eval: top_p = 1.0 must be in \(0, 1\] and top_k = -1 >= 0"):
        load_plan(TOY, ["eval.top_k=-1"])


def test_plan_evaluator_samples_with_eval_top_k():
    from transformers import AutoTokenizer

    from megatron_s2d.stages.job import plan_evaluator

    ev = plan_evaluator(load_plan(TOY, ["eval.top_k=20", "eval.top_p=0.8", "eval.temperature=0.7", "eval.k=2",
                                        "data.eval.toy-test.limit=3"]), log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(str(WORLD / "tokenizer"))
    engine = RecordingEngine(tokenizer)
    out = ev.evaluate(engine, tokenizer, [tokenizer.eos_token_id], show_progress=False)
    assert engine.params and all((p.top_k, p.top_p, p.temperature, p.n) == (20, 0.8, 0.7, 2) for p in engine.params)
    assert out["toy-test"]["sampling"]["top_k"] == 20 and out["toy-test"]["n_problems"] == 3
