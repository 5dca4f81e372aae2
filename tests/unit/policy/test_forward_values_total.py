"""``forward_values`` is total: an empty share (0 rows) gets the same keys as a full one, each (0, T, ...) with the
same dtype and trailing shape, so the scoring methods built on it (``logprobs``, ``logprobs_at``, ``topk``) return
empty tensors instead of failing on a missing key. Before, an empty batch gave ``{}``."""

import torch

from tests.distributed._launch import run_distributed

CFG = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
           max_position_embeddings=64)


def _job(rank, world):
    from megatron_s2d.config import ModelConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    pol = MegatronModel(arch_from_hf_config(CFG), ModelConfig(dtype="fp32"), micro_batch_tokens=64)
    g = torch.Generator().manual_seed(0)
    n, t, k = 3, 10, 4
    full = {"tokens": torch.randint(0, 64, (n, t), generator=g), "lengths": torch.tensor([10, 7, 9]),
            "ids": torch.randint(0, 64, (n, t, k), generator=g)}
    empty = {key: v[:0] for key, v in full.items()}
    obj = O.logprob_values(pol.tp_group, 0.7, topk=3, ids_key="ids", tail=True)
    shapes = {}
    for name, batch in (("full", full), ("empty", empty)):
        shapes[name] = {key: (tuple(v.shape), v.dtype) for key, v in pol.forward_values(batch, obj, 64).items()}
    rb = RolloutBatch(tokens=empty["tokens"], lengths=empty["lengths"], loss_mask=torch.zeros(0, t),
                      engine_logprobs=torch.zeros(0, t), topk_ids=empty["ids"])
    vals, ids = pol.topk(rb, 3, 0.7)
    scores = pol.logprobs_at(rb, 0.7, tail=True)
    shapes["methods"] = [tuple(x.shape) for x in (pol.logprobs(rb, 0.7), vals, ids, scores.at_ids, scores.log_tail)]
    return shapes


def test_an_empty_share_gets_every_key_with_no_rows():
    out = run_distributed(_job, world_size=1)[0]
    full, empty = out["full"], out["empty"]
    assert set(full) == {"logprobs", "topk_logprobs", "topk_ids", "logprobs_at_ids", "log_tail_at_ids"}
    assert set(empty) == set(full)
    for key, (shape, dtype) in full.items():
        assert empty[key] == ((0,) + shape[1:], dtype), key
    assert out["methods"] == [(0, 10), (0, 10, 3), (0, 10, 3), (0, 10, 4), (0, 10)]
