"""Conversion with the Transformer Engine layer spec in bf16 on one GPU (skipped without CUDA + TE).

For Llama-3.1 and Qwen3 tied / untied tiny models saved in bf16:
- the converted checkpoint loads into the TE-spec model (whose ``core_attention._extra_state`` the checkpoint does not
  have: tolerated) and the HF export is bit-exact;
- TE bf16 logits are close to HF bf16 logits on the GPU (tolerances are bf16-sized: measured max |diff| ~1e-2);
- a checkpoint saved from the TE model converts back to HF bit-exactly and loads into the local spec;
- ``verify_logits`` in fp32 passes at 1e-4 with the local spec, and at 2e-3 with the TE spec (measured on an H100:
  TE bf16 vs HF bf16 max |diff| ~1e-2, KL ~4e-6; TE fp32 vs HF fp32 max |diff| 4-6e-4).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KINDS = ("llama", "qwen3_tied", "qwen3_untied")


@pytest.fixture(scope="module")
def dist_one():
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine (the `gpu` extra)")
    from megatron_s2d.runtime.dist import init_distributed

    return init_distributed(1, 1)


def _hf_bf16_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        return model(ids.cuda()).logits.float()


@pytest.mark.parametrize("kind", KINDS)
def test_te_bf16_conversion(kind, dist_one, tmp_path):
    from checkpoints_convert import convert_hf_to_megatron, convert_megatron_to_hf, verify_logits
    from checkpoints_convert.verify import logit_stats, megatron_logits
    from megatron_s2d.models import ModelOptions, build_gpt_model
    from megatron_s2d.checkpoint import model_ckpt
    from tests.unit.convert._tiny import assert_bit_exact, make_hf_model, read_hf_tensors, tokens

    hf = make_hf_model(kind, tmp_path / "hf", sharded=kind == "llama", dtype=torch.bfloat16)
    original = read_hf_tensors(hf)
    ckpt = convert_hf_to_megatron(hf, tmp_path / "meg").out_dir
    arch, meta = model_ckpt.read_model_meta(ckpt)
    assert meta["dtype"] == "bf16"

    te_model = build_gpt_model(arch, ModelOptions(dtype="bf16", use_te="yes")).eval()
    model_ckpt.load_model_checkpoint(te_model, ckpt)
    assert_bit_exact({n: t.cpu().clone() for n, t in model_ckpt.export_hf_state(te_model, arch)}, original)

    ids = tokens()
    te_logits = megatron_logits(te_model, ids)
    diff, kl = logit_stats(_hf_bf16_logits(hf, ids).cpu(), te_logits.cpu())
    print(f"{kind}: TE bf16 vs HF bf16 logits: max |diff| {diff:.2e}, KL {kl:.2e}")
    assert diff < 5e-2 and kl < 1e-3, (diff, kl)

    model_ckpt.save_model_checkpoint(te_model, tmp_path / "te_saved", arch, "bf16",
                                     tokenizer_dir=ckpt / "tokenizer", hf_extra_dir=ckpt / "hf_extra")
    convert_megatron_to_hf(tmp_path / "te_saved", tmp_path / "hf2")
    assert_bit_exact(read_hf_tensors(tmp_path / "hf2"), original)
    local = build_gpt_model(arch, ModelOptions(dtype="bf16", use_te="no")).eval()
    model_ckpt.load_model_checkpoint(local, tmp_path / "te_saved")
    diff, kl = logit_stats(te_logits.cpu(), megatron_logits(local, ids).cpu())
    assert diff < 5e-2 and kl < 1e-3, (diff, kl)

    for use_te, atol in (("no", 1e-4), ("yes", 2e-3)):
        result = verify_logits(hf, ckpt, atol=atol, tokens=ids, use_te=use_te)
        print(f"{kind}: use_te={use_te}: {result.summary()}")
        assert result.ok, result.summary()
