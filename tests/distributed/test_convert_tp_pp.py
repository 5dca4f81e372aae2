"""Converted checkpoints at TP2/PP1 and TP1/PP2 in two gloo processes, for Llama-3.1 and Qwen3 tied / untied:

- the live model's HF export (TP all-gather, PP broadcast) is bit-exact against the original HF tensors;
- logits match HF to 1e-4 at TP2 and PP2 (``verify_logits``: vocab-parallel logits gathered, stages chained);
- a checkpoint saved at TP2 (``save_model_checkpoint``) converts back to HF bit-exactly, and loads at TP1 giving
  logits identical to the HF-converted checkpoint's at TP1.
Everything runs in one spawn to pay the process start-up once.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints_convert import convert_hf_to_megatron
from tests.distributed._launch import run_distributed
from tests.unit.convert._tiny import KINDS, make_hf_model

pytestmark = pytest.mark.distributed


def _load(ckpt, tp, pp):
    from megatron_s2d.models import ModelOptions, build_gpt_model
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint, read_model_meta

    init_distributed(tp, pp)
    arch, _ = read_model_meta(ckpt)
    model = build_gpt_model(arch, ModelOptions(dtype="fp32")).eval()
    load_model_checkpoint(model, ckpt)
    return arch, model


def _check_all(rank: int, world_size: int, hf: dict, ckpts: dict, work: str) -> dict:
    from pathlib import Path

    from checkpoints_convert import convert_megatron_to_hf, verify_logits
    from checkpoints_convert.verify import megatron_logits
    from megatron_s2d.checkpoint.model_ckpt import export_hf_state, save_model_checkpoint
    from tests.unit.convert._tiny import assert_bit_exact, read_hf_tensors, tokens

    report = {}
    ids = tokens()
    for kind in KINDS:
        original = read_hf_tensors(hf[kind])
        for tp, pp in ((2, 1), (1, 2)):
            arch, model = _load(ckpts[kind], tp, pp)
            assert_bit_exact({n: t.clone() for n, t in export_hf_state(model, arch)}, original)
            result = verify_logits(hf[kind], ckpts[kind], tp=tp, pp=pp, tokens=ids)
            assert result.ok and result.kl_mean < 1e-8, (kind, tp, pp, result.summary())
            report[f"{kind}-tp{tp}pp{pp}"] = result.max_abs_diff
            if (tp, pp) == (2, 1):
                saved = Path(work) / kind / "tp2"
                save_model_checkpoint(model, saved, arch, "fp32", tokenizer_dir=Path(ckpts[kind]) / "tokenizer",
                                      hf_extra_dir=Path(ckpts[kind]) / "hf_extra")
                logits_tp2 = megatron_logits(model, ids)
        if rank == 0:  # offline conversion needs no process group
            convert_megatron_to_hf(saved, Path(work) / kind / "hf_from_tp2")
            assert_bit_exact(read_hf_tensors(Path(work) / kind / "hf_from_tp2"), original)
        _, from_tp2 = _load(saved, 1, 1)
        _, from_hf = _load(ckpts[kind], 1, 1)
        a, b = megatron_logits(from_tp2, ids), megatron_logits(from_hf, ids)
        assert torch.equal(a, b), kind
        torch.testing.assert_close(a, logits_tp2, rtol=0, atol=1e-5)
    return report


def test_convert_tp_pp(tmp_path):
    hf = {k: str(make_hf_model(k, tmp_path / "hf" / k, sharded=k == "llama")) for k in KINDS}
    ckpts = {k: str(convert_hf_to_megatron(hf[k], tmp_path / "meg" / k, tp=2).out_dir) for k in KINDS}
    reports = run_distributed(_check_all, world_size=2, timeout=400, hf=hf, ckpts=ckpts, work=str(tmp_path / "w"))
    assert reports[0] == reports[1] and len(reports[0]) == 2 * len(KINDS)
    assert max(reports[0].values()) < 1e-4
