"""FP8 with Transformer Engine on one GPU (skipped without CUDA + TE): shapes, recipes, and the sampler (review F2-F4).

- ``test_unpadded_fp8_shapes_are_refused_by_te``: a batch of odd lengths [37, 61, 90] whose token count is not a
  multiple of 8 reaches TE's FP8 GEMM shape assert when the policy does not pad (token multiple forced to 1): the
  failure the padding exists for.
- ``test_fp8_train_step_matrix``: delayed / tensorwise / blockwise, padded and packed (THD with a filler sequence),
  the same odd lengths: log-probs, the train step's loss and grad norm stay within FP8 tolerance of the bf16 model.
- ``test_fp8_sampler_follows_the_updated_weights``: a tensorwise-FP8 policy takes a large-lr update; the megatron
  sampler then generates 7 greedy rows (an FP8 decode step of 7 rows would be refused: the sampler runs bf16) whose
  log-probs equal a teacher-forced bf16 forward of the *updated* weights and the FP8 policy's own log-probs within
  FP8 tolerance, while the update moved the log-probs far more than that.
CPU covers the masking exactly (tests/unit/policy/test_fp8_padding.py) and the sampler's FP8/SP switches
(tests/unit/rollout/test_sampler_generation_mode.py). Tolerances here are first guesses: not yet run on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# every GEMM dim a multiple of 128 (blockwise quantizes 128-wide blocks): qkv 4*64 + 2*2*64 = 512, fc1 2*512
CFG = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=500000.0,
           tie_word_embeddings=False, max_position_embeddings=512)
LENGTHS = [37, 61, 90]
RECIPES = ["delayed", "tensorwise", "blockwise"]


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine (the `gpu` extra)")
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(CFG)
    g = torch.Generator().manual_seed(1)
    init = {k: torch.randn(*s, generator=g) * 0.02 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (torch.ones_like(v) if "norm" in k else v) for k, v in init.items()}
    return arch, init


def _policy(arch, init, fp8, pack=False, lr=1e-4):
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy

    pol = TrainablePolicy(MegatronModel(arch, ModelConfig(use_te="yes", dtype="bf16", fp8=fp8, pack_sequences=pack)),
                          OptimConfig(lr=lr, adam_eps=1e-8, grad_clip=0.0))
    assert pol.uses_te
    load_hf_state(pol.module, arch, lambda k: init[k].cuda())
    pol.weights_changed()  # bf16: the optimizer's fp32 main params copy the loaded weights
    return pol


def _batch(rows: list[list[int]], prompt_lens: list[int] | None = None):
    n, t = len(rows), max(len(r) for r in rows)
    tokens = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, (prompt_lens[i] if prompt_lens else 4):len(r)] = 1
    return dict(tokens=tokens, lengths=torch.tensor([len(r) for r in rows]), loss_mask=mask)


def _odd_batch():
    g = torch.Generator().manual_seed(2)
    return _batch([torch.randint(1, CFG["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS])


def _step(pol, batch):
    from megatron_s2d.policy import objectives as O

    vals = pol.forward_values(batch, O.logprob_values(None, 1.0), 512)
    n = batch["tokens"].shape[0]
    b = dict(batch, old_logprobs=vals["logprobs"], advantages=torch.linspace(0.5, 1.5, n))  # a loss far from 0
    norm = O.Normalisers(float(batch["loss_mask"].sum()), float(n))
    res = pol.train_step(b, O.policy_gradient(None, norm, eps_low=0.2, eps_high=0.28, temperature=1.0), 512)
    return vals["logprobs"], res


@pytest.mark.parametrize("recipe", RECIPES)
def test_unpadded_fp8_shapes_are_refused_by_te(setup, recipe):
    from megatron_s2d.policy import objectives as O

    pol = _policy(*setup, fp8=recipe)
    assert pol.token_multiple == (128 if recipe == "blockwise" else 16)
    pol.token_multiple = 1  # what the policy did before: one micro-batch of (3, 90) = 270 tokens
    with pytest.raises(AssertionError, match="FP8 execution requires"):
        pol.forward_values(_odd_batch(), O.logprob_values(None, 1.0), 512)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_train_step_matrix(setup, recipe, pack):
    arch, init = setup
    batch = _odd_batch()
    mask = batch["loss_mask"].bool()
    lp16, r16 = _step(_policy(arch, init, None, pack), batch)
    torch.cuda.reset_peak_memory_stats()
    lp8, r8 = _step(_policy(arch, init, recipe, pack), batch)
    diff = (lp8 - lp16)[mask].abs()
    print(f"{recipe} {'packed' if pack else 'padded'}: |lp fp8 - bf16| mean {diff.mean():.3g} max {diff.max():.3g}; "
          f"loss {r8.metrics['pg_loss_sum']:.4g} vs {r16.metrics['pg_loss_sum']:.4g}; grad_norm "
          f"{r8.metrics['grad_norm']:.4g} vs {r16.metrics['grad_norm']:.4g}; peak "
          f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    assert diff.mean() < 0.05 and diff.max() < 0.5
    assert r8.metrics["pg_loss_sum"] == pytest.approx(r16.metrics["pg_loss_sum"], rel=0.05)
    assert r8.metrics["grad_norm"] == pytest.approx(r16.metrics["grad_norm"], rel=0.15)


def test_fp8_sampler_follows_the_updated_weights(setup):
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.rollout import MegatronSampler, SamplingParams
    from megatron_s2d.rollout.megatron_sampler import _generation_forward

    arch, init = setup
    pol = _policy(arch, init, "tensorwise", lr=3e-3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, CFG["vocab_size"], (n,), generator=g).tolist() for n in (5, 9, 13, 17, 21, 7, 11)]
    sampler = MegatronSampler(pol.module, arch, eos_token_ids=[])
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)

    def scored(result):
        """The samples as a batch; their log-probs from the sampler, an FP8 and a bf16 teacher-forced forward."""
        samples = [grp[0] for grp in result.samples]
        batch = _batch([s.prompt_ids + s.response_ids for s in samples], [len(s.prompt_ids) for s in samples])
        mask = batch["loss_mask"].bool()
        engine = torch.zeros(mask.shape)
        for i, s in enumerate(samples):
            engine[i, len(s.prompt_ids):len(s.prompt_ids) + len(s.response_ids)] = torch.tensor(s.logprobs)
        fp8 = pol.forward_values(batch, O.logprob_values(None, 1.0), 2048)["logprobs"]
        with _generation_forward(pol.module):
            bf16 = pol.forward_values(batch, O.logprob_values(None, 1.0), 2048)["logprobs"]
        return batch, mask, engine[mask], fp8[mask], bf16[mask]

    batch, mask, _, fp8_before, _ = scored(sampler.generate(prompts, params))
    b = dict(batch, old_logprobs=pol.forward_values(batch, O.logprob_values(None, 1.0), 2048)["logprobs"],
             advantages=-torch.ones(batch["tokens"].shape[0]))  # push the greedy tokens down: the argmax moves
    norm = O.Normalisers(float(mask.sum()), float(mask.shape[0]))
    for _ in range(3):
        pol.train_step(b, O.policy_gradient(None, norm, eps_low=0.99, eps_high=10.0, temperature=1.0), 2048)
    moved = (pol.forward_values(batch, O.logprob_values(None, 1.0), 2048)["logprobs"][mask] - fp8_before).abs()

    _, _, engine, fp8, bf16 = scored(sampler.generate(prompts, params))
    to_bf16, to_fp8 = (engine - bf16).abs(), (engine - fp8).abs()
    print(f"update moved the log-probs by {moved.mean():.3g} (mean); sampler vs bf16 teacher-forced: mean "
          f"{to_bf16.mean():.3g} max {to_bf16.max():.3g}; vs FP8 policy: mean {to_fp8.mean():.3g}")
    assert moved.mean() > 0.5  # the update is large, so stale weights would show
    assert to_bf16.mean() < 0.02 and to_bf16.max() < 0.2
    assert to_fp8.mean() < 0.1
