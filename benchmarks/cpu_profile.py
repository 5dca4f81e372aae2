"""The CPU device profile of the dry run's price model (``launch.price_constants.CPU_2CORE``), measured on this machine.

    python benchmarks/cpu_profile.py            # ~1-2 min on 2 cores; prints one RESULT line (JSON)

What the analytic model (``launch.pricing``) needs from a device, each measured here as the best of ``--repeats``
(the VM is shared: the best run is the one least disturbed by other work):
  peak_flops            fp32 matmul FLOP/s (2048 x 2048, the threads a stage job uses: ``S2D_THREADS`` or every core)
  mem_bytes_per_s       read bandwidth: the sum of a 512 MiB fp32 tensor (decode reads its weights and KV cache)
  train_mfu             the toy teacher's (shipped world) full train step, GRPO objective, on a toy GRPO step's batch
                        (64 rows x 64 tokens, one micro-batch: the toy plan's micro_batch_tokens), optimizer included:
                        6 x params x tokens / step time / peak_flops
  score_mfu             the same model's forward-only log-probs of the same batch: 2 x params x tokens / time / peak
  decode_step_s_per_layer  the megatron sampler's time per decode step at batch 1 (no stop token, 64 new tokens) /
                        layers: the per-step cost no batch amortises (Python, kernel dispatch, sampling)
It also prints the sampler's step at the toy GRPO batch (64 rows) for reference. No asserts: this reports figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=64, help="rows of the toy GRPO step (8 prompts x 8 samples)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per row (toy prompt ~30 + response ~30)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, int(os.environ.get("S2D_THREADS", os.cpu_count() or 1))))  # as stages.entry does
    out = {"threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out["peak_flops"] = 2 * 2048**3 / _best(lambda: torch.mm(a, b), args.repeats)
    big = torch.ones(128 * 2**20)  # 512 MiB
    out["mem_bytes_per_s"] = big.numel() * 4 / _best(lambda: big.sum(), args.repeats)
    del a, b, big

    from megatron.core import parallel_state as ps

    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.models import load_arch
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy
    from megatron_s2d.rollout import MegatronSampler, SamplingParams
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.toy.build import shipped_world

    world, why = shipped_world(0)
    if world is None:
        raise SystemExit(f"no shipped toy world: {why}")
    init_distributed(1, 1)
    arch = load_arch(world.root / "teacher")
    policy = TrainablePolicy(MegatronModel(arch, ModelConfig(dtype="fp32")), OptimConfig(lr=1e-4), total_updates=1000)
    tp = ps.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)
    n, seq = args.rows, args.seq
    tokens = torch.randint(0, arch.vocab_size, (n, seq), generator=g)
    mask = torch.zeros(n, seq)
    mask[:, seq // 2:] = 1.0  # the prompt half carries no loss
    batch = dict(tokens=tokens, lengths=torch.full((n,), seq), loss_mask=mask)
    mbt = n * seq  # one micro-batch, as the toy plan's micro_batch_tokens (8192) gives
    score = lambda: policy.forward_values(batch, O.logprob_values(tp, 1.0), mbt)  # noqa: E731
    old = score()["logprobs"]
    norm = O.Normalisers(float(mask.sum()), float(n))
    b = dict(batch, old_logprobs=old, advantages=torch.randn(n, generator=g))
    train = lambda: policy.train_step(b, O.policy_gradient(tp, norm, eps_low=0.2, eps_high=0.28,  # noqa: E731
                                                           temperature=1.0), mbt)
    p, ntok = arch.num_params, n * seq
    out.update(params=p, layers=arch.num_layers, tokens=ntok)
    out["train_step_s"] = _best(train, args.repeats)
    out["score_s"] = _best(score, args.repeats)
    out["train_mfu"] = 6 * p * ntok / out["train_step_s"] / out["peak_flops"]
    out["score_mfu"] = 2 * p * ntok / out["score_s"] / out["peak_flops"]

    sampler = MegatronSampler(policy.module, arch, max_batch_tokens=65536, eos_token_ids=[])
    new = 64
    prompt = tokens[0, : seq // 2].tolist()
    one = _best(lambda: sampler.generate([prompt], SamplingParams(max_new_tokens=new, seed=1)), args.repeats)
    out["decode_step_s_batch1"] = one / new
    out["decode_step_s_per_layer"] = one / new / arch.num_layers
    rows = _best(lambda: sampler.generate([prompt] * (n // 8), SamplingParams(n=8, max_new_tokens=new, seed=1)),
                 args.repeats)
    out["decode_step_s_batch%d" % n] = rows / new
    print("RESULT " + json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
