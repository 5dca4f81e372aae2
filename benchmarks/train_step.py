"""Train-step and teacher-scoring throughput of the megatron policy, with the GRPO / OPD overhead vs plain CE.

    python benchmarks/train_step.py                       # CPU: tiny model, so the script never rots
    python benchmarks/train_step.py --preset llama8b --layers 8 --seq 4096 --fp8 delayed   # one H100

Measures, on the same model and batch, the full ``TrainablePolicy.train_step`` (forward + backward through our
vocab-parallel log-prob path + megatron optimizer step) with three objectives:
  ce    token-mean NLL of the sequence (the plain cross-entropy step; the SFT / forward-KL-sampled objective)
  grpo  clipped policy gradient with per-sequence advantages (Stage 1 / 3)
  opd   clipped policy gradient with per-token advantages log pi_T - log pi_S (Stage 2b)
and the forward-only frozen scorer (teacher log-probs of every token) in tokens/s.
Model TFLOP/s uses Megatron's formula: 6 * N_matmul + 6 * L * h * s per token (2x for forward only), the same
as shared/gpu/baseline_bench.py, so figures compare side by side. The optimizer step is inside the timed region.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

PRESETS = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                 max_position_embeddings=2048, tie_word_embeddings=False),
    "llama8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def flops_per_token(arch, seq: int, forward_only: bool) -> float:
    h, L, q, kv = arch.hidden_size, arch.num_layers, arch.num_attention_heads, arch.num_kv_heads
    d = arch.head_dim
    n_matmul = L * (h * (q + 2 * kv) * d + q * d * h + 3 * h * arch.intermediate_size) + h * arch.vocab_size
    mult = 2 if forward_only else 6
    return mult * n_matmul + mult * L * h * seq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocab size (the log-prob pass "
                    "scales with it: e.g. --vocab 32000 on CPU to see the objectives' overhead)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--seqs", type=int, default=None, help="sequences per step")
    ap.add_argument("--micro-batch-tokens", type=int, default=None)
    ap.add_argument("--fp8", default=None, choices=[None, "delayed", "tensorwise", "blockwise"])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--objectives", default="ce,grpo,opd")
    ap.add_argument("--score-layers", type=int, default=None, help="layers of the frozen scorer (default: --layers)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    preset = args.preset or ("llama8b" if cuda else "tiny")
    cfg = dict(PRESETS[preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.vocab:
        cfg["vocab_size"] = args.vocab
    seq = args.seq or (4096 if cuda else 128)
    n_seq = args.seqs or (4 if cuda else 8)
    mbt = args.micro_batch_tokens or seq
    iters = args.iters or (5 if cuda else 3)

    from megatron.core import parallel_state as ps

    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.losses import opd_token_advantages
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(cfg)
    dtype = "bf16" if cuda else "fp32"
    mcfg = ModelConfig(dtype=dtype, fp8=args.fp8)
    policy = TrainablePolicy(MegatronModel(arch, mcfg), OptimConfig(lr=1e-6), total_updates=100)
    tp = ps.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (n_seq, seq), generator=g)
    mask = torch.zeros(n_seq, seq)
    mask[:, seq // 8:] = 1.0  # a short prompt, then the response tokens that carry the loss
    batch = dict(tokens=tokens, lengths=torch.full((n_seq,), seq), loss_mask=mask)
    norm = O.Normalisers(float(mask.sum()), float(n_seq))
    old = policy.forward_values(batch, O.logprob_values(tp, 1.0), mbt)["logprobs"]
    teacher_lp = old - torch.rand(n_seq, seq, generator=g)

    def ce(logits, mb):
        from megatron_s2d import losses

        lp = O.target_logprobs(logits, mb, tp)
        return losses.sft_loss(lp, mb["loss_mask"], norm.num_tokens)

    objectives = {
        "ce": (lambda: ce, {}),
        "grpo": (lambda: O.policy_gradient(tp, norm, eps_low=0.2, eps_high=0.28, temperature=1.0),
                 {"old_logprobs": old, "advantages": torch.randn(n_seq, generator=g)}),
        "opd": (lambda: O.policy_gradient(tp, norm, eps_low=0.2, eps_high=0.28, temperature=1.0),
                {"old_logprobs": old, "advantages": opd_token_advantages(teacher_lp, old, mask)}),
    }
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "preset": preset, "layers": arch.num_layers,
               "seq": seq, "seqs_per_step": n_seq, "micro_batch_tokens": mbt, "dtype": dtype, "fp8": args.fp8,
               "params": arch.num_params}
    fl = flops_per_token(arch, seq, forward_only=False)
    for name in args.objectives.split(","):
        make, extra = objectives[name]
        b = dict(batch, **extra)
        for _ in range(args.warmup):
            policy.train_step(b, make(), mbt)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            policy.train_step(b, make(), mbt)
        sync()
        dt = (time.perf_counter() - t0) / iters
        tps = n_seq * seq / dt
        results[f"{name}_step_s"] = round(dt, 4)
        results[f"{name}_tokens_per_s"] = round(tps, 1)
        results[f"{name}_model_tflops"] = round(tps * fl / 1e12, 2)
    for name in ("grpo", "opd"):
        if f"{name}_step_s" in results and "ce_step_s" in results:
            results[f"{name}_over_ce"] = round(results[f"{name}_step_s"] / results["ce_step_s"], 4)
    if cuda:
        results["train_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # frozen scorer: forward-only teacher log-probs of every token
    del policy
    if cuda:
        torch.cuda.empty_cache()
    if args.score_layers:
        cfg["num_hidden_layers"] = args.score_layers
    sarch = arch_from_hf_config(cfg)
    scorer = MegatronModel(sarch, mcfg)
    obj = O.logprob_values(tp, 1.0)
    scorer.forward_values(batch, obj, mbt)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        scorer.forward_values(batch, obj, mbt)
    sync()
    dt = (time.perf_counter() - t0) / iters
    tps = n_seq * seq / dt
    results.update(score_layers=sarch.num_layers, score_tokens_per_s=round(tps, 1),
                   score_model_tflops=round(tps * flops_per_token(sarch, seq, True) / 1e12, 2))
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
