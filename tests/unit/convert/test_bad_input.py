"""Bad input gives a clear S2DError naming the problem and writes nothing; a conversion that fails half-way leaves
neither a complete-looking folder nor temp files, and --overwrite replaces the old folder only at the very end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoints_convert import convert_hf_to_megatron, convert_megatron_to_hf, main, verify_logits
from megatron_s2d.checkpoint.hf_io import HFWeights
from megatron_s2d.errors import S2DError
from tests.unit.convert._tiny import read_hf_tensors


def _variant(src, dst, tensors=None, config=None):
    """Copy an HF folder, optionally rewriting its tensors (as one file) and/or config fields."""
    shutil.copytree(src, dst)
    if tensors is not None:
        new = tensors(read_hf_tensors(src))
        for p in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
            p.unlink()
        save_file(new, str(dst / "model.safetensors"))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _without(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


CASES = {
    "missing": (dict(tensors=_without("model.layers.1.mlp.up_proj.weight")), {},
                r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    "extra": (dict(tensors=lambda t: {**t, "model.layers.2.mlp.up_proj.weight": torch.zeros(2)}), {},
              r"unexpected tensors .*model\.layers\.2\.mlp\.up_proj\.weight"),
    "shape": (dict(tensors=lambda t: {**t, "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}), {},
              r"'model\.layers\.0\.self_attn\.q_proj\.weight': expected \(128, 64\), got \(64, 64\)"),
    "arch": (dict(config={"model_type": "mistral"}), {}, r"'model_type' = 'mistral' is not supported"),
    "moe": (dict(config={"num_experts": 8}), {}, r"'num_experts' = 8 \(mixture of experts\) is not supported"),
    "tp_heads": ({}, dict(tp=3), r"num_attention_heads = 4 is not divisible by tensor_parallel = 3"),
    "tp_groups": ({}, dict(tp=4), r"num_key_value_heads \(query groups\) = 2 is not divisible by tensor_parallel"),
    "tp_vocab": (dict(config={"vocab_size": 255}), dict(tp=1 + 1), r"vocab_size = 255 is not divisible"),
    "pp_layers": ({}, dict(pp=3), r"num_hidden_layers = 2 is not divisible by pipeline_parallel = 3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_hf_input_raises_and_writes_nothing(case, hf_models, tmp_path):
    variant, kwargs, match = CASES[case]
    src = _variant(hf_models["qwen3_untied"], tmp_path / "src", **variant)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(S2DError, match=match):
        convert_hf_to_megatron(src, out_parent / "meg", **kwargs)
    assert list(out_parent.iterdir()) == []


def test_existing_output_and_failure_half_way(hf_models, converted, tmp_path, monkeypatch):
    src = hf_models["llama"]
    out = tmp_path / "meg"
    shutil.copytree(converted["llama"], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(S2DError, match="already exists"):
        convert_hf_to_megatron(src, out)
    real_read, calls = HFWeights.read, []

    def failing_read(self, name):
        calls.append(name)
        if len(calls) > 5:
            raise OSError("disk on fire")
        return real_read(self, name)

    monkeypatch.setattr(HFWeights, "read", failing_read)
    with pytest.raises(OSError, match="disk on fire"):
        convert_hf_to_megatron(src, out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # old folder untouched
    with pytest.raises(OSError):
        convert_hf_to_megatron(src, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meg"]  # no new folder, no hidden temp folder
    monkeypatch.setattr(HFWeights, "read", real_read)
    convert_hf_to_megatron(src, out, overwrite=True, dtype="bf16")  # a complete conversion does replace it
    assert json.loads((out / "s2d_model.json").read_text())["dtype"] == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meg"]


def test_bad_megatron_input(hf_models, converted, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(S2DError, match="not a megatron-s2d model checkpoint"):
        convert_megatron_to_hf(hf_models["llama"], out)
    with pytest.raises(S2DError, match="does not describe the checkpoint's architecture.*model_type"):
        convert_megatron_to_hf(converted["llama"], out, hf_reference=hf_models["qwen3_untied"])
    edited = tmp_path / "edited"
    shutil.copytree(converted["llama"], edited)
    meta = json.loads((edited / "s2d_model.json").read_text())
    meta["arch"]["intermediate_size"] = 256
    (edited / "s2d_model.json").write_text(json.dumps(meta))
    (edited / "hf_extra" / "config.json").unlink()
    with pytest.raises(S2DError, match=r"decoder\.layers\.mlp\.linear_fc1\.weight: expected \(2, 512, 64\), "
                                       r"got \(2, 256, 64\)"):
        convert_megatron_to_hf(edited, out)
    with pytest.raises(S2DError, match="already exists"):
        convert_megatron_to_hf(converted["llama"], edited)
    with pytest.raises(S2DError, match="different architectures"):
        verify_logits(hf_models["qwen3_tied"], converted["llama"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_cli(hf_models, tmp_path, capsys):
    out = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", "--hf", str(hf_models["qwen3_tied"]), "--out", str(out), "--tp",
                 "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["hf-to-megatron", "--hf", str(hf_models["qwen3_tied"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["megatron-to-hf", "--megatron", str(out), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert main(["verify", "--hf", str(hf_models["qwen3_tied"]), "--megatron", str(out), "--seq-len", "8"]) == 0
    assert "verify OK" in capsys.readouterr().out
    import argparse

    from checkpoints_convert import add_convert_subcommands

    parser = argparse.ArgumentParser()
    add_convert_subcommands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["convert", "verify", "--hf", "a", "--megatron", "b", "--tp", "2"])
    assert (args.tp, args.pp, args.atol) == (2, 1, 1e-4) and callable(args.fn)
