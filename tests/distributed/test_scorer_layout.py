"""A frozen teacher in a TP/PP layout of its own scores every stage-DP rank's rows exactly as one process would.

The student layout is megatron's global one (parallel_state); the teacher gets its own groups
(runtime.groups.model_groups) and a FrozenScorer routes rows between the two. Reference: the same checkpoint scored
by one process at TP1 on all rows. Covered layouts (2 gloo processes, and one 4-process case):
  student TP1 x DP2  -> teacher TP2       (a teacher TP group spans two student DP ranks: gather, score, scatter)
  student TP1 x DP2  -> teacher PP2       (tied embeddings, the teacher's own pipeline groups)
  student TP2 x DP1  -> teacher TP1 x DP2 (two teacher replicas split one student batch)
  student TP1 x DP4  -> teacher TP2 x PP2 (the 70B-teacher shape: one replica serves four student ranks)
The weights come from a megatron dist checkpoint saved at TP1 (the path stages use), and top-k / at-ids outputs
are routed too. The student's own (global-layout) model keeps working next to the teacher.
"""

import pytest
import torch

from tests.distributed._launch import run_distributed

pytestmark = pytest.mark.distributed

CFG = dict(model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
           tie_word_embeddings=True, max_position_embeddings=64)
ROWS = 12


def _all_rows():
    g = torch.Generator().manual_seed(3)
    t = 20
    tokens = torch.randint(0, 96, (ROWS, t), generator=g)
    lengths = torch.randint(5, t + 1, (ROWS,), generator=g)
    mask = torch.zeros(ROWS, t)
    for i in range(ROWS):
        tokens[i, lengths[i]:] = 0
        mask[i, 2:lengths[i]] = 1
    ids = torch.randint(0, 96, (ROWS, t, 3), generator=g)
    return dict(tokens=tokens, lengths=lengths, loss_mask=mask, student_topk_ids=ids)


def _my_rows(dp_rank, dp):
    """Uneven shares (rank 0 gets fewer rows) so the balanced split cuts through a rank's rows."""
    cuts = [0] + [ROWS * (k + 1) // dp - (1 if k == 0 and dp > 1 else 0) for k in range(dp - 1)] + [ROWS]
    return list(range(cuts[dp_rank], cuts[dp_rank + 1]))


def _save(rank, world, path):
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.config import ModelConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state, save_model_checkpoint

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.3 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    pol = MegatronModel(arch, ModelConfig(dtype="fp32"))
    load_hf_state(pol.module, arch, lambda n: init[n])
    save_model_checkpoint(pol.module, path, arch, "fp32")


def _score(rank, world, path, student, teacher, topk=2, rows_of=None):
    from megatron.core import parallel_state as ps

    from megatron_s2d.config import ModelConfig
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.scorer import RoutedScorer
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.runtime.groups import model_groups
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint, read_model_meta

    init_distributed(*student)
    arch, _ = read_model_meta(path)
    groups = model_groups(*teacher)
    model = MegatronModel(arch, ModelConfig(tp=teacher[0], pp=teacher[1], dtype="fp32"), groups=groups,
                          initialize=False)
    load_model_checkpoint(model.module, path)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = _my_rows(dp_rank, dp) if rows_of is None else rows_of[dp_rank]
    full = _all_rows()
    batch = {k: v[rows] for k, v in full.items()}
    t = int(batch["lengths"].max()) if rows else 7
    batch = {k: (v[:, :t] if v.dim() >= 2 else v) for k, v in batch.items()}  # each rank its own padded width
    scorer = model if groups.is_global else RoutedScorer(model, dp_rank)  # policy.load.LoadedModel.scorer
    obj = O.logprob_values(scorer.tp_group, 1.0, topk=topk, ids_key="student_topk_ids")
    out = scorer.forward_values(batch, obj, micro_batch_tokens=40)
    # the student's own model, on the global layout, still runs next to the teacher
    student_model = MegatronModel(arch, ModelConfig(tp=student[0], pp=student[1], dtype="fp32"))
    load_model_checkpoint(student_model.module, path)
    mine = student_model.forward_values(batch, O.logprob_values(ps.get_tensor_model_parallel_group(), 1.0), 40)
    return {"rows": rows, "out": out, "student": mine["logprobs"], "own_layout": not groups.is_global,
            "replicas": groups.dp}


def _reference(rank, world, path):
    return _score(rank, world, path, (1, 1), (1, 1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "ckpt"
    run_distributed(_save, world_size=1, path=str(path))
    ref = run_distributed(_reference, world_size=1, path=str(path))[0]
    assert not ref["own_layout"]
    return str(path), ref


def _check(outs, ref):
    for o in outs:
        assert o["own_layout"]
        for k, v in ref["out"].items():
            got = o["out"][k]
            want = v[o["rows"]][:, : got.shape[1]]
            assert want.shape == got.shape, k
            if k == "topk_ids":
                assert torch.equal(got, want), k
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=k)
        torch.testing.assert_close(o["student"], o["out"]["logprobs"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("student,teacher", [((1, 1), (2, 1)), ((1, 1), (1, 2)), ((2, 1), (1, 1))],
                         ids=["teacherTP2-studentDP2", "teacherPP2-studentDP2", "teacherDP2-studentTP2"])
def test_teacher_own_layout_matches_single_process(ckpt, student, teacher):
    path, ref = ckpt
    outs = run_distributed(_score, world_size=2, timeout=180, path=path, student=student, teacher=teacher)
    _check(outs, ref)


def test_teacher_tp2_pp2_serves_four_student_ranks(ckpt):
    path, ref = ckpt
    outs = run_distributed(_score, world_size=4, timeout=240, threads_per_rank=1, path=path, student=(1, 1),
                           teacher=(2, 2))
    assert [o["replicas"] for o in outs] == [1] * 4
    assert sorted(r for o in outs for r in o["rows"]) == list(range(ROWS))
    _check(outs, ref)


@pytest.mark.parametrize("student,teacher,rows_of", [
    ((1, 1), (2, 1), [[], list(range(ROWS))]),  # a stage rank with no rows: it receives nothing back
    ((2, 1), (1, 1), [[5]]),  # two teacher replicas, one row: one replica has no piece (its placeholder pass)
    ((1, 1), (2, 1), [[], []]),  # nobody has rows: no piece anywhere
], ids=["empty-stage-rank", "empty-replica", "all-empty"])
def test_empty_shares_get_every_key(ckpt, student, teacher, rows_of):
    """forward_values is total on the routed path too: every rank gets every key, (0, T, ...) for an empty share."""
    path, ref = ckpt
    outs = run_distributed(_score, world_size=2, timeout=180, path=path, student=student, teacher=teacher,
                           rows_of=rows_of)
    for o in outs:
        assert set(o["out"]) == set(ref["out"])
        assert all(v.shape[0] == len(o["rows"]) for v in o["out"].values())
    _check(outs, ref)


def _cache_agreement(rank, world, root):
    from pathlib import Path

    from megatron_s2d.runtime.dist import all_ranks_agree

    mine = Path(root) / f"dp_rank_{rank:05d}.pt"
    first = all_ranks_agree(mine.is_file())  # nobody has a cache
    if rank == 0:
        mine.write_text("x")
    torch.distributed.barrier()
    partial = all_ranks_agree(mine.is_file())  # only rank 0 has one (a crash between the two saves)
    if rank == 1:
        mine.write_text("x")
    torch.distributed.barrier()
    return first, partial, all_ranks_agree(mine.is_file())


def test_teacher_cache_is_used_only_when_every_rank_has_it(tmp_path):
    """A partial teacher cache must send every rank down the generating branch (its collectives span the job)."""
    assert run_distributed(_cache_agreement, world_size=2, root=str(tmp_path)) == [(False, False, True)] * 2
