"""GRPO and OPD train steps give the same loss and updated parameters at TP2, PP2 and DP2 as at TP1/PP1/DP1.

Each layout runs in its own gloo job: identical initial weights (loaded from one seeded HF-named state), one batch
of variable-length sequences, one optimizer step; the updated full weights are gathered back in HF names and
compared. Adam uses a large eps so its first update is smooth in the gradient (a tiny eps turns it into sign(g),
which amplifies last-bit differences of near-zero gradients into full lr-sized steps).
"""

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = pytest.mark.distributed

CFG = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=64)


def _batch(n=8, t=24, vocab=128):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n, t), generator=g)
    lengths = torch.randint(12, t + 1, (n,), generator=g)
    mask = torch.zeros(n, t)
    for i in range(n):
        mask[i, 6:lengths[i]] = 1
        tokens[i, lengths[i]:] = 0
    teacher_lp = -torch.rand(n, t, generator=g) * 3
    return dict(tokens=tokens, lengths=lengths, loss_mask=mask), teacher_lp


def _job(rank, world, tp, pp, kind, nan=False, pack=False):
    from megatron.core import parallel_state as ps

    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.losses import opd_token_advantages
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import NonFiniteError, TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import export_hf_state, load_hf_state

    init_distributed(tp, pp)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.05 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    pol = TrainablePolicy(MegatronModel(arch, ModelConfig(tp=tp, pp=pp, pack_sequences=pack, dtype="fp32")),
                          OptimConfig(lr=1e-2, adam_eps=1e-2, grad_clip=0.0))
    load_hf_state(pol.module, arch, lambda n: init[n])
    batch, teacher_lp = _batch()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = list(range(dp_rank * 8 // dp, (dp_rank + 1) * 8 // dp))
    batch = {k: v[rows] for k, v in batch.items()}
    teacher_lp = teacher_lp[rows]
    tp_group = ps.get_tensor_model_parallel_group()
    old = pol.forward_values(batch, O.logprob_values(tp_group, 1.0), 40)["logprobs"]
    ids = torch.randint(0, 128, (8, 24, 3), generator=torch.Generator().manual_seed(5))[rows]
    extra = pol.forward_values(dict(batch, ids=ids), O.logprob_values(tp_group, 0.7, topk=3, ids_key="ids"), 40)
    batch["old_logprobs"] = old
    if kind == "grpo":
        batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.5])[rows]
    else:
        batch["advantages"] = opd_token_advantages(teacher_lp, old, batch["loss_mask"])
    if nan:
        batch["advantages"] = batch["advantages"] * float("nan")
    counts = torch.tensor([batch["loss_mask"].sum(), float(len(rows))])
    torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())
    norm = O.Normalisers(float(counts[0]), float(counts[1]))
    obj = O.policy_gradient(tp_group, norm, eps_low=0.2, eps_high=0.28, temperature=1.0)
    before = {k: v.clone() for k, v in export_hf_state(pol.module, arch)}
    if nan:
        try:
            pol.train_step(batch, obj, 40)
        except NonFiniteError as e:
            after = {k: v.clone() for k, v in export_hf_state(pol.module, arch)}
            return {"error": str(e), "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
        return {"error": None}
    res = pol.train_step(batch, obj, 40)
    after = {k: v.clone() for k, v in export_hf_state(pol.module, arch)}
    return {"metrics": res.metrics, "old": old, "extra": extra, "rows": rows, "after": after,
            "padded_tokens": res.padded_tokens,
            "changed": sum(not torch.equal(before[k], after[k]) for k in before), "n": len(before)}


def _compare(ref, other, name):
    for key in ("pg_loss_sum", "token_count", "ratio_max", "grad_norm", "entropy_sum"):
        assert other["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-6), (name, key)
    for k, v in ref["after"].items():
        torch.testing.assert_close(other["after"][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("kind", ["grpo", "opd"])
def test_train_step_equal_across_layouts(kind):
    ref = run_distributed(_job, world_size=1, tp=1, pp=1, kind=kind)[0]
    assert ref["changed"] == ref["n"], "every parameter must change after one step"
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        outs = run_distributed(_job, world_size=2, tp=tp, pp=pp, kind=kind)
        _compare(ref, outs[0], name)
        if name == "dp2":  # each DP rank saw half the rows; their log-probs match the reference rows
            for o in outs:
                torch.testing.assert_close(o["old"], ref["old"][o["rows"]], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(outs[0]["old"], ref["old"], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_without_update():
    outs = run_distributed(_job, world_size=2, tp=2, pp=1, kind="grpo", nan=True)
    for o in outs:
        assert o["error"] and "non-finite" in o["error"]
        assert o["unchanged"]


def test_packed_sequences_equal_padded_across_layouts():
    """Packing (one row of whole sequences, block-diagonal attention) changes no value: log-probs, top-k, log-probs
    at given ids, the GRPO step's loss, grad norm and updated weights equal the padded TP1 run, at TP1, TP2, PP2."""
    ref = run_distributed(_job, world_size=1, tp=1, pp=1, kind="grpo")[0]
    for name, world, tp, pp in (("packed-tp1", 1, 1, 1), ("packed-tp2", 2, 2, 1), ("packed-pp2", 2, 1, 2)):
        out = run_distributed(_job, world_size=world, tp=tp, pp=pp, kind="grpo", pack=True)[0]
        _compare(ref, out, name)
        torch.testing.assert_close(out["old"], ref["old"], rtol=1e-5, atol=1e-5)
        for k, v in ref["extra"].items():
            if k == "topk_ids":
                assert torch.equal(out["extra"][k], v), name
            else:
                torch.testing.assert_close(out["extra"][k], v, rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
        real = int(sum(_batch()[0]["lengths"]))
        assert out["padded_tokens"] == real < ref["padded_tokens"], name  # nothing is padding when packed
