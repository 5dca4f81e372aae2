"""The vocab-parallel log-prob kernel alone: what the entropy metric costs, separate pass vs fused.

    python benchmarks/logprob_kernel.py                          # CPU: 2048 tokens x 32k vocab, fp32 logits
    python benchmarks/logprob_kernel.py --tokens 16384 --vocab 128256 --dtype bf16   # one GPU (Llama-3 vocab)

Times forward + backward of the train objectives' log-prob path on one (tokens, vocab) logits tensor:
  lp            token_logprobs only (what a plain CE step pays)
  lp+entropy    token_logprobs, then entropy() in a second no-grad pass (the train objectives before fusing)
  lp(fused H)   token_logprobs(..., return_entropy=True): entropy from the same pass (the objectives now)
and prints each time and the ratio to ``lp``. TP = 1 (the per-rank cost under TP is the same on V / tp columns).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: unchunked)")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    from megatron_s2d.policy.logprobs import entropy, token_logprobs

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, generator=g, device=dev) * 3).to(dtype)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cs = args.chunk_size

    def lp_only(x):
        return token_logprobs(x, ids, chunk_size=cs).sum()

    def lp_then_entropy(x):
        out = token_logprobs(x, ids, chunk_size=cs)
        with torch.no_grad():
            entropy(x.detach(), chunk_size=cs).sum()
        return out.sum()

    def lp_fused(x):
        out, ent = token_logprobs(x, ids, chunk_size=cs, return_entropy=True)
        ent.sum()
        return out.sum()

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tokens": args.tokens,
               "vocab": args.vocab, "dtype": str(dtype).replace("torch.", ""), "chunk_size": cs}
    for name, fn in (("lp", lp_only), ("lp+entropy", lp_then_entropy), ("lp(fused H)", lp_fused)):
        x = logits.detach().clone().requires_grad_(True)
        fn(x).backward()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            x.grad = None
            fn(x).backward()
        sync()
        results[f"{name}_ms"] = round((time.perf_counter() - t0) / args.iters * 1e3, 2)
    for name in ("lp+entropy", "lp(fused H)"):
        results[f"{name}_over_lp"] = round(results[f"{name}_ms"] / results["lp_ms"], 3)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
