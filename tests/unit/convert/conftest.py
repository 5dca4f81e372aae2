"""Session fixtures: the three tiny HF models (Llama-3.1 sharded, Qwen3 tied single-file, Qwen3 untied sharded) and
their fp32 megatron conversions, built once per test session."""

from __future__ import annotations

import pytest

from checkpoints_convert import convert_hf_to_megatron
from tests.unit.convert._tiny import KINDS, make_hf_model

SHARDED = {"llama": True, "qwen3_tied": False, "qwen3_untied": True}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: make_hf_model(k, root / k, sharded=SHARDED[k]) for k in KINDS}


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return {k: convert_hf_to_megatron(p, root / k, tp=2, pp=2).out_dir for k, p in hf_models.items()}
