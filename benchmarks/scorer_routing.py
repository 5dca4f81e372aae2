"""Teacher scoring at the job's layout vs at a layout of its own (routed rows), and what the routing costs.

    python benchmarks/scorer_routing.py                       # CPU: 2 gloo processes, tiny model
    python benchmarks/scorer_routing.py --nproc 8 --teacher-tp 8 --preset llama8b --layers 8 --seq 4096  # 8 GPUs

The student layout is TP1 x DP(nproc). The same teacher weights score every rank's rows (a) at TP1 (each rank its
own rows, no routing) and (b) at TP=--teacher-tp (one replica per teacher-tp ranks: rows gathered, scored, scattered
back through two all-to-alls). Prints tokens/s of both and the seconds spent in the two exchanges.
Re-launches itself under torchrun when started as a plain script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
import zlib

import torch

from train_step import PRESETS  # the train-step benchmark's presets (this folder is on sys.path)


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--teacher-tp", type=int, default=2)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocab (default 2048 for tiny)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=16, help="sequences per rank")
    ap.add_argument("--iters", type=int, default=3)
    return ap.parse_args()


def main() -> None:
    args = _args()
    if "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(cmd))
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_s2d.models.state_dict import hf_shapes
    from megatron_s2d.config import ModelConfig
    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy import objectives as O
    from megatron_s2d.policy import scorer as S
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.runtime.groups import model_groups
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    init_distributed(1, 1)
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    vocab = args.vocab or (2048 if args.preset == "tiny" else None)
    if vocab:
        cfg["vocab_size"] = vocab
    arch = arch_from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    shapes = hf_shapes(arch)
    rank = dist.get_rank()
    tokens = torch.randint(0, arch.vocab_size, (args.seqs, args.seq), generator=torch.Generator().manual_seed(rank))
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.seqs,), generator=torch.Generator().manual_seed(rank))
    batch = dict(tokens=tokens, lengths=lengths, loss_mask=torch.ones(args.seqs, args.seq))
    n_tokens = torch.tensor([float(lengths.sum())])
    dist.all_reduce(n_tokens)
    spent = {"exchange_s": 0.0}
    real_exchange = S.exchange

    def timed_exchange(send, group=None):
        t0 = time.perf_counter()
        try:
            return real_exchange(send, group)
        finally:
            spent["exchange_s"] += time.perf_counter() - t0

    S.exchange = timed_exchange
    dtype = "bf16" if cuda else "fp32"
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "nproc": args.nproc, "preset": args.preset,
               "layers": arch.num_layers, "seq": args.seq, "seqs_per_rank": args.seqs, "dtype": dtype}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, tp in (("same_layout_tp1", 1), (f"own_layout_tp{args.teacher_tp}", args.teacher_tp)):
        groups = model_groups(tp, 1)
        model = MegatronModel(arch, ModelConfig(tp=tp, dtype=dtype), groups=groups, initialize=False)
        weights = {}

        def read(k):  # identical full weights on every rank (seeded), generated lazily per tensor
            if k not in weights:
                weights[k] = torch.randn(*shapes[k], generator=g.manual_seed(zlib.crc32(k.encode()))) * 0.02
            return weights[k]

        load_hf_state(model.module, arch, read)
        scorer = model if groups.is_global else S.RoutedScorer(model, rank)
        obj = O.logprob_values(scorer.tp_group, 1.0)
        scorer.forward_values(batch, obj, args.seq * 4)  # warm-up
        sync()
        dist.barrier()
        spent["exchange_s"] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.iters):
            scorer.forward_values(batch, obj, args.seq * 4)
        sync()
        dist.barrier()
        dt = (time.perf_counter() - t0) / args.iters
        results[f"{name}_tokens_per_s"] = round(float(n_tokens) / dt, 1)
        results[f"{name}_exchange_s_per_call"] = round(spent["exchange_s"] / args.iters, 4)
        results[f"{name}_s_per_call"] = round(dt, 4)
        del model, scorer
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
