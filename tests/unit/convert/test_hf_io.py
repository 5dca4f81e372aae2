"""Streaming safetensors I/O: our writer's shards read back with the official safetensors loader, our reader reads
transformers' sharded saves, sizes parse, and HF folders split into tokenizer / extra / weight files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_s2d.checkpoint.hf_io import HFWeights, ShardedSafetensorsWriter, parse_size, sort_hf_files
from megatron_s2d.errors import S2DError


def test_writer_shards_by_size_and_official_loader_reads_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 7, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
               "c": torch.randn(40, 5, generator=g), "d": torch.randn(2, 2, generator=g).to(torch.bfloat16)}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardedSafetensorsWriter(tmp_path, plan, max_shard_bytes=400)  # c (800 B) gets a shard of its own
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert len(set(index["weight_map"].values())) == len(w.files) == 3
    got = {}
    for f in w.files:
        got.update(load_file(str(tmp_path / f)))
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    reader = HFWeights(tmp_path)
    assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("a", (2,), torch.float32), ("b", (2,), torch.float32)], 100)
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="not written"):
        w.close()


def test_reader_single_file_and_errors(tmp_path):
    save_file({"x": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "model.safetensors"))
    r = HFWeights(tmp_path)
    assert r.tensors["x"].shape == (2, 3) and torch.equal(r.read("x"), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(S2DError, match="no tensor 'y'"):
        r.read("y")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(S2DError, match=r"pytorch_model.bin: convert \.bin weights"):
        HFWeights(empty)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1234") == 1234
    with pytest.raises(S2DError, match="--shard-size"):
        parse_size("lots")


def test_sort_hf_files(tmp_path):
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "model.safetensors", "model.safetensors.index.json", "chat_template.jinja", ".hidden"):
        (tmp_path / name).write_text("{}")
    tok, extra = sort_hf_files(tmp_path)
    assert [p.name for p in tok] == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in extra] == ["README.md", "config.json", "generation_config.json"]
