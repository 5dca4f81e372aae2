"""The TransformerConfig choices of models/build.py: CPU (local spec) vs Transformer Engine, and the FP8 recipes.

The TE settings cannot run here (no GPU), so the config arguments are checked as data (``config_kwargs``), and every
combination is also handed to megatron-core's own ``TransformerConfig`` where it can be built on CPU (a wrong or
renamed argument fails there). tests/gpu/test_fp8_gpu.py runs them on a GPU.
"""

from __future__ import annotations

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.models import ModelOptions, arch_from_hf_config
from megatron_s2d.models.build import build_gpt_model, config_kwargs, transformer_config

ARCH = arch_from_hf_config(dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32))
FUSIONS = ("bias_activation_fusion", "apply_rope_fusion", "gradient_accumulation_fusion")


def test_cpu_spec_keeps_fusions_and_sequence_parallel_off():
    for tp in (1, 2):
        kw = config_kwargs(ARCH, ModelOptions(), tp, 1, use_te=False)
        assert not any(kw[f] for f in FUSIONS) and kw["sequence_parallel"] is False


def test_te_turns_fusions_and_sequence_parallel_on():
    from megatron.core.tensor_parallel import layers

    kw = config_kwargs(ARCH, ModelOptions(), 2, 1, use_te=True)
    assert kw["bias_activation_fusion"] and kw["apply_rope_fusion"] and kw["sequence_parallel"]
    # the output layer (a megatron ColumnParallelLinear, not TE) needs apex's kernel for the fused wgrad
    assert kw["gradient_accumulation_fusion"] is bool(layers._grad_accum_fusion_available)
    assert config_kwargs(ARCH, ModelOptions(), 1, 1, use_te=True)["sequence_parallel"] is False  # TP1: nothing to split


@pytest.mark.parametrize("recipe,fmt", [("delayed", "hybrid"), ("tensorwise", "hybrid"), ("blockwise", "e4m3")])
def test_fp8_recipe_settings(recipe, fmt):
    kw = config_kwargs(ARCH, ModelOptions(fp8=recipe), 1, 1, use_te=True)
    assert (kw["fp8"], kw["fp8_recipe"]) == (fmt, recipe)
    delayed = recipe == "delayed"
    # delayed scaling: amaxes reduced over the TP group only (DP ranks run different numbers of forwards)
    assert kw.get("tp_only_amax_red", False) is delayed
    assert (kw.get("fp8_amax_history_len"), kw.get("fp8_amax_compute_algo")) == ((1024, "max") if delayed else
                                                                                  (None, None))
    config = transformer_config(ARCH, ModelOptions(fp8=recipe), 1, 1)  # megatron-core takes every argument
    assert (config.fp8, config.fp8_recipe, config.tp_only_amax_red) == (fmt, recipe, delayed)
    assert config.fp8_amax_history_len == (1024 if delayed else 1)


def test_fp8_refusals():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    with pytest.raises(S2DError, match="model.fp8 needs Transformer Engine"):
        build_gpt_model(ARCH, ModelOptions(fp8="tensorwise"))
    # a model at a layout of its own (pg_collection): delayed scaling's amax group would be the job's layout
    with pytest.raises(S2DError, match="'delayed' for a model at a layout of its own.*tensorwise or blockwise"):
        build_gpt_model(ARCH, ModelOptions(fp8="delayed"),
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def test_local_model_records_its_token_multiple():
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    model = build_gpt_model(ARCH, ModelOptions(use_te="no"))
    assert model.s2d_token_multiple == 1 and model.config.sequence_parallel is False
    assert not any(getattr(model.config, f) for f in FUSIONS)
