"""``convert`` subcommands: hf-to-megatron | megatron-to-hf | verify.

The ``s2d`` CLI calls :func:`add_convert_subcommands` on its top-level subparsers (giving ``s2d convert ...``); each
leaf parser sets ``fn`` (``args.fn(args) -> exit code``), the convention of every ``s2d`` subcommand.
Standalone: ``python -m checkpoints_convert <sub> ...`` (a leading ``convert`` is accepted too). ``verify`` at tp*pp > 1 relaunches itself under ``torch.distributed.run``
with tp*pp processes unless it already runs under torchrun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from megatron_s2d.errors import S2DError


def _hf_to_megatron(args) -> int:
    from megatron_s2d.checkpoint.hf_to_megatron import convert_hf_to_megatron

    r = convert_hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {r.out_dir}: {r.num_tensors} tensors, {r.bytes_written / 1e9:.3f} GB in {r.seconds:.1f} s "
          f"({r.gb_per_s:.2f} GB/s)" + "".join(f"\n  {n}" for n in r.notes))
    return 0


def _megatron_to_hf(args) -> int:
    from megatron_s2d.checkpoint.megatron_to_hf import convert_megatron_to_hf

    r = convert_megatron_to_hf(args.megatron, args.out, hf_reference=args.hf_reference, dtype=args.dtype,
                               shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"wrote {r.out_dir}: {r.num_tensors} tensors, {r.bytes_written / 1e9:.3f} GB in {r.seconds:.1f} s "
          f"({r.gb_per_s:.2f} GB/s)" + "".join(f"\n  {n}" for n in r.notes))
    return 0


def _verify_argv(args) -> list[str]:
    return ["verify", "--hf", str(args.hf), "--megatron", str(args.megatron), "--tp", str(args.tp),
            "--pp", str(args.pp), "--atol", repr(args.atol), "--batch", str(args.batch),
            "--seq-len", str(args.seq_len), "--seed", str(args.seed)]


def _verify(args) -> int:
    n = args.tp * args.pp
    if n > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "checkpoints_convert", *_verify_argv(args)]
        return subprocess.call(cmd)
    from checkpoints_convert.verify import verify_logits

    r = verify_logits(args.hf, args.megatron, tp=args.tp, pp=args.pp, atol=args.atol, batch=args.batch,
                      seq_len=args.seq_len, seed=args.seed)
    if int(os.environ.get("RANK", "0")) == 0:
        print(r.summary())
    return 0 if r.ok else 1


def _example(command: str) -> str:
    return f"example:\n  {command}"


def _add_leafs(sub, **parser_kw) -> None:
    """The three leaf parsers; ``parser_kw`` goes to each (``s2d`` passes its help formatter)."""
    what = "HF safetensors folder -> megatron-s2d model checkpoint folder"
    p = sub.add_parser("hf-to-megatron", help=what, description=what, **parser_kw,
                       epilog=_example("s2d convert hf-to-megatron --hf Qwen3-8B --out ckpt/qwen3-8b --tp 2 --pp 1 "
                                       "--dtype bf16"))
    p.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="intended tensor-parallel size (validated, recorded)")
    p.add_argument("--pp", type=int, default=1, help="intended pipeline-parallel size (validated, recorded)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="stored dtype (default: bf16 for a bf16 checkpoint, else fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (only once the new folder is complete)")
    p.set_defaults(fn=_hf_to_megatron)

    what = "megatron-s2d model checkpoint folder -> HF safetensors folder"
    p = sub.add_parser("megatron-to-hf", help=what, description=what, **parser_kw,
                       epilog=_example("s2d convert megatron-to-hf --megatron runs/x/stages/student_rl/checkpoints/"
                                       "step_000200 --out release/"))
    p.add_argument("--megatron", required=True, help="megatron-s2d model checkpoint folder")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--hf-reference", default=None, help="HF folder whose config.json / tokenizer to use")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="output dtype (default: as stored)")
    p.add_argument("--shard-size", default="5GB", help="max safetensors shard size, e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds a previous export")
    p.set_defaults(fn=_megatron_to_hf)

    what = "compare HF and megatron logits on the same tokens (fp32)"
    p = sub.add_parser("verify", help=what, description=what, **parser_kw,
                       epilog=_example("s2d convert verify --hf Qwen3-8B --megatron ckpt/qwen3-8b --tp 2"))
    p.add_argument("--hf", required=True, help="HF model folder")
    p.add_argument("--megatron", required=True, help="megatron-s2d model checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at (relaunches "
                                                     "itself on tp*pp processes)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    p.add_argument("--atol", type=float, default=1e-4, help="max allowed |logit diff| (exit 1 above it)")
    p.add_argument("--batch", type=int, default=2, help="sequences compared")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.set_defaults(fn=_verify)


def add_convert_subcommands(subparsers, **parser_kw) -> argparse.ArgumentParser:
    """Add ``convert {hf-to-megatron,megatron-to-hf,verify}`` to an argparse subparsers object (``parser_kw``: to
    every parser it adds, e.g. ``formatter_class``)."""
    what = "HF <-> megatron checkpoint conversion and verification"
    conv = subparsers.add_parser("convert", help=what, description=what, **parser_kw,
                                 epilog=_example("s2d convert hf-to-megatron --help"))
    _add_leafs(conv.add_subparsers(dest="convert_command", required=True, metavar="{hf-to-megatron,"
                                                                                    "megatron-to-hf,verify}"),
               **parser_kw)
    return conv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__.split("\n")[0])
    _add_leafs(parser.add_subparsers(dest="convert_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except S2DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
