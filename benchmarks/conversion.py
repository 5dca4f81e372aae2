"""Conversion throughput and peak memory: a synthetic Llama-shaped HF checkpoint -> megatron -> HF.

    python benchmarks/conversion.py [--params 1e9] [--small] [--workdir DIR] [--shard-size 2GB] [--keep]

Builds a random bf16 Llama-3-shaped checkpoint with ~``--params`` parameters (vocab 128256, untied; tensors written
straight to sharded safetensors, no HF model is instantiated), converts it HF -> megatron and back, each direction
in its own child process so that each peak RSS (VmHWM) is its own, and checks that the round trip
is bit-exact. Prints GB/s (tensor bytes / wall seconds) and peak RSS next to the model size and the largest tensor:
streaming means the peak stays near "Python + torch + megatron imports + a few tensors", not the model size.
``--small`` is a ~40M-parameter quick check. No asserts besides the bit-exact round trip: this reports figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_arch(params: float, small: bool):
    from megatron_s2d.models.arch import ArchSpec

    vocab = 32000 if small else 128256
    h = 256 if small else 2048 if params <= 2e9 else 4096 if params <= 2e10 else 8192
    heads, kv, ffn = h // 64, max(1, min(8, h // 64)), 4 * h
    per_layer = h * (heads * 64) * 2 + 2 * h * kv * 64 + 3 * h * ffn + 2 * h
    layers = max(1, round((params - 2 * vocab * h) / per_layer)) if not small else 4
    return ArchSpec(model_type="llama", vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_layers=layers,
                    num_attention_heads=heads, num_kv_heads=kv, head_dim=64, rms_norm_eps=1e-5, rope_theta=5e5,
                    max_position_embeddings=8192, tie_word_embeddings=False, qk_norm=False)


def write_synthetic_hf(arch, out: Path, shard_size: int) -> int:
    """Random bf16 tensors in HF names/shapes, streamed to safetensors shards; returns tensor bytes."""
    from megatron_s2d.models import llama
    from megatron_s2d.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_s2d.models.state_dict import tensor_maps

    out.mkdir(parents=True)
    plan = [(n, s, torch.bfloat16) for m in tensor_maps(arch) for n, s in zip(m.hf_names, m.hf_shapes)]
    writer = ShardedSafetensorsWriter(out, plan, shard_size)
    g = torch.Generator().manual_seed(0)
    for name, shape, dtype in plan:
        writer.write(name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(llama.hf_config(arch, "bf16"), indent=2))
    (out / "tokenizer_config.json").write_text("{}\n")
    return writer.total_size


def _vm_hwm() -> int:
    """Peak resident memory of this process in bytes. ``getrusage``'s ru_maxrss is not used: on Linux it survives
    fork + exec, so a child would report its parent's peak; VmHWM belongs to the process's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # non-Linux fallback (KiB on Linux, B on macOS)


def _child(direction: str, src: str, dst: str, shard_size: str) -> None:
    """Runs in a fresh process: one conversion; prints a JSON line with time and memory."""
    import megatron.core.dist_checkpointing.strategies.checkpointable  # noqa: F401 - imports out of the timing
    import torch.distributed.checkpoint  # noqa: F401
    import transformers  # noqa: F401

    from checkpoints_convert import convert_hf_to_megatron, convert_megatron_to_hf

    peak_before = _vm_hwm()
    start = time.perf_counter()
    if direction == "hf2meg":
        r = convert_hf_to_megatron(src, dst)
    else:
        r = convert_megatron_to_hf(src, dst, shard_size=shard_size)
    seconds = time.perf_counter() - start
    peak = _vm_hwm()
    print(json.dumps({"seconds": seconds, "bytes": r.bytes_written, "peak_before": peak_before, "peak_rss": peak}))


def _run_child(direction: str, src: Path, dst: Path, shard_size: str) -> dict:
    cmd = [sys.executable, __file__, "--child", direction, "--src", str(src), "--dst", str(dst),
           "--shard-size", shard_size]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _check_bit_exact(a: Path, b: Path) -> int:
    from megatron_s2d.checkpoint.hf_io import HFWeights

    wa, wb = HFWeights(a), HFWeights(b)
    if set(wa.tensors) != set(wb.tensors):
        raise SystemExit(f"round trip changed the tensor names: {sorted(set(wa.tensors) ^ set(wb.tensors))[:5]}")
    for name in wa.tensors:
        if not torch.equal(wa.read(name), wb.read(name)):
            raise SystemExit(f"round trip changed tensor {name}")
    return len(wa.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", choices=["hf2meg", "meg2hf"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.src, args.dst, args.shard_size)
        return
    from megatron_s2d.checkpoint.hf_io import parse_size
    from megatron_s2d.models.state_dict import tensor_maps

    arch = synthetic_arch(args.params, args.small)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="s2d_conv_bench_"))
    biggest = max(torch.Size(s).numel() for m in tensor_maps(arch) for s in m.hf_shapes) * 2
    try:
        t = time.perf_counter()
        nbytes = write_synthetic_hf(arch, work / "hf", parse_size(args.shard_size))
        print(f"synthetic Llama: {arch.num_params / 1e9:.3f} B params (h={arch.hidden_size}, L={arch.num_layers}, "
              f"ffn={arch.intermediate_size}, vocab={arch.vocab_size}), {nbytes / 1e9:.2f} GB bf16, largest tensor "
              f"{biggest / 1e9:.2f} GB; written in {time.perf_counter() - t:.1f} s")
        for direction, src, dst in (("hf2meg", work / "hf", work / "meg"), ("meg2hf", work / "meg", work / "hf2")):
            r = _run_child(direction, src, dst, args.shard_size)
            print(f"{direction}: {r['seconds']:.1f} s, {r['bytes'] / 1e9 / r['seconds']:.2f} GB/s, peak RSS "
                  f"{r['peak_rss'] / 2**30:.2f} GiB (after imports {r['peak_before'] / 2**30:.2f} GiB; model "
                  f"{nbytes / 2**30:.2f} GiB)")
        n = _check_bit_exact(work / "hf", work / "hf2")
        print(f"round trip bit-exact: {n} tensors")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
