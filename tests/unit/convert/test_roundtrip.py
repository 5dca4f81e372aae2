"""HF -> megatron -> HF is bit-exact (fp32 and bf16), logits match HF at TP1, the live-model export is bit-exact, and
the folder carries meta / tokenizer / config; config.json is regenerated correctly when none was carried."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints_convert import convert_hf_to_megatron, convert_megatron_to_hf, verify_logits
from megatron_s2d.checkpoint import model_ckpt
from tests.unit.convert._tiny import KINDS, TOKENIZER_FILES, assert_bit_exact, hf_logits, read_hf_tensors, tokens


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_bit_exact_and_folder_contents(kind, hf_models, converted, tmp_path):
    ckpt = converted[kind]
    arch, meta = model_ckpt.read_model_meta(ckpt)
    assert meta["saved_layout"] == {"tp": 2, "pp": 2} and meta["dtype"] == "fp32"
    assert arch.tie_word_embeddings == (kind == "qwen3_tied")
    assert {p.name for p in (ckpt / "tokenizer").iterdir()} == set(TOKENIZER_FILES)
    assert {"config.json", "generation_config.json"} <= {p.name for p in (ckpt / "hf_extra").iterdir()}
    report = convert_megatron_to_hf(ckpt, tmp_path / "hf", shard_size="100KB")
    assert "hf_extra/config.json" in report.notes[0]
    out = tmp_path / "hf"
    assert_bit_exact(read_hf_tensors(out), read_hf_tensors(hf_models[kind]))
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_export_at_tp1(kind, hf_models, converted):
    from megatron_s2d.models import ModelOptions, build_gpt_model
    from megatron_s2d.runtime.dist import init_distributed

    result = verify_logits(hf_models[kind], converted[kind], atol=1e-4, seq_len=24)
    assert result.ok and result.max_abs_diff < 1e-4 and result.kl_mean < 1e-8, result.summary()
    init_distributed(1, 1)
    arch, _ = model_ckpt.read_model_meta(converted[kind])
    model = build_gpt_model(arch, ModelOptions(dtype="fp32"))
    model_ckpt.load_model_checkpoint(model, converted[kind])
    exported = {n: t.clone() for n, t in model_ckpt.export_hf_state(model, arch)}
    assert_bit_exact(exported, read_hf_tensors(hf_models[kind]))
    # and loading HF tensors straight into a live model gives the same parameters back
    fresh = build_gpt_model(arch, ModelOptions(dtype="fp32", seed=7))
    model_ckpt.load_hf_state(fresh, arch, exported.__getitem__)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_bf16_roundtrip(hf_models, tmp_path):
    src = hf_models["qwen3_tied"]
    ckpt = convert_hf_to_megatron(src, tmp_path / "meg", dtype="bf16").out_dir
    assert model_ckpt.read_model_meta(ckpt)[1]["dtype"] == "bf16"
    convert_megatron_to_hf(ckpt, tmp_path / "hf_bf16")
    want = {k: v.to(torch.bfloat16) for k, v in read_hf_tensors(src).items()}
    assert_bit_exact(read_hf_tensors(tmp_path / "hf_bf16"), want)
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    convert_megatron_to_hf(ckpt, tmp_path / "hf_fp32", dtype="fp32")
    assert_bit_exact(read_hf_tensors(tmp_path / "hf_fp32"), {k: v.float() for k, v in want.items()})
    # a bf16 HF checkpoint converts to bf16 by default
    back = convert_hf_to_megatron(tmp_path / "hf_bf16", tmp_path / "meg2").out_dir
    assert model_ckpt.read_model_meta(back)[1]["dtype"] == "bf16"


@pytest.mark.parametrize("kind", ["llama", "qwen3_untied"])
def test_regenerated_config_and_reference(kind, hf_models, converted, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted[kind], ckpt)
    (ckpt / "hf_extra" / "config.json").unlink()
    report = convert_megatron_to_hf(ckpt, tmp_path / "regen")
    assert "regenerated" in report.notes[0]
    cfg = json.loads((tmp_path / "regen" / "config.json").read_text())
    assert cfg["model_type"] == kind.split("_")[0] and cfg["architectures"][0].endswith("ForCausalLM")
    ids = tokens()
    torch.testing.assert_close(hf_logits(tmp_path / "regen", ids), hf_logits(hf_models[kind], ids), rtol=0,
                               atol=1e-6)
    report = convert_megatron_to_hf(ckpt, tmp_path / "ref", hf_reference=hf_models[kind])
    assert str(hf_models[kind]) in report.notes[0]
    ref_cfg = json.loads((hf_models[kind] / "config.json").read_text())
    assert json.loads((tmp_path / "ref" / "config.json").read_text()) == {**ref_cfg, "dtype": "float32"}
