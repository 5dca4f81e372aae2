"""``s2d eval``: avg@k of any checkpoint (megatron-s2d checkpoint or HF folder) on named or local data sets.

Under torchrun with ``--tp N`` the megatron engine runs tensor-parallel; problems are spread over data-parallel
ranks. With ``--engine vllm`` an HF folder is served by vLLM directly (a megatron checkpoint is exported to HF first).
Output: a table on stdout and, with ``--out``, JSON with the sampling parameters recorded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from megatron_s2d.errors import S2DError


def _as_megatron(model_dir: Path, tmp: Path) -> Path:
    if (model_dir / "s2d_model.json").is_file():
        return model_dir
    if (model_dir / "config.json").is_file():
        from megatron_s2d.checkpoint.hf_to_megatron import convert_hf_to_megatron

        out = tmp / "megatron"
        convert_hf_to_megatron(model_dir, out)
        return out
    raise S2DError(f"--model {model_dir}: neither a megatron-s2d checkpoint (s2d_model.json) nor an HF folder "
                   "(config.json)")


def _as_hf(model_dir: Path, tmp: Path) -> Path:
    if (model_dir / "config.json").is_file():
        return model_dir
    from megatron_s2d.checkpoint.megatron_to_hf import convert_megatron_to_hf

    out = tmp / "hf"
    convert_megatron_to_hf(model_dir, out)
    return out


def main(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from megatron_s2d.config import ModelConfig
    from megatron_s2d.data.sources import load_source
    from megatron_s2d.eval.runner import DataParallel, Evaluator
    from megatron_s2d.runtime.dist import data_parallel_group, init_distributed

    if args.k < 1:
        raise S2DError(f"--k = {args.k}: must be >= 1")
    model_dir = Path(args.model)
    sets = [(name, load_source(name, args.limit)) for name in args.data]
    info = init_distributed(args.tp, 1, seed=args.seed)
    evaluator = Evaluator(sets=sets, k=args.k, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, instruction=None, seed=args.seed)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.engine == "vllm":
            from megatron_s2d.rollout.vllm_engine import VLLMEngine

            hf = _as_hf(model_dir, tmp)
            tokenizer = AutoTokenizer.from_pretrained(str(hf))
            engine = VLLMEngine(str(hf), seed=args.seed)
            gen_cfg = json.loads((hf / "generation_config.json").read_text()) \
                if (hf / "generation_config.json").is_file() else {}
            stop = gen_cfg.get("eos_token_id", tokenizer.eos_token_id)
            stop = tuple(stop) if isinstance(stop, list) else (stop,)
        else:
            from megatron_s2d.checkpoint.assets import ModelAssets
            from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint
            from megatron_s2d.policy.megatron_policy import MegatronPolicy
            from megatron_s2d.rollout.megatron_sampler import MegatronSampler

            assets = ModelAssets.load(_as_megatron(model_dir, tmp))
            policy = MegatronPolicy(assets.arch, ModelConfig(tp=args.tp, dtype=assets.meta["dtype"]), optim=None,
                                    seed=args.seed)
            load_model_checkpoint(policy.module, assets.path)
            tokenizer, stop = assets.tokenizer, assets.stop_ids
            engine = MegatronSampler(policy.module, assets.arch, eos_token_ids=list(stop), pad_token_id=assets.pad_id)
        results = evaluator.evaluate(engine, tokenizer, stop, dp=DataParallel(info.dp_rank, info.dp,
                                                                             data_parallel_group()),
                                     show_progress=info.is_main)
        engine.close()
    if info.is_main:
        print(f"| data | avg@{args.k} | stderr | problems |\n|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {100 * r['avg']:.2f} | {100 * r['stderr']:.2f} | {r['n_problems']} |")
        out = {"model": str(model_dir), "engine": args.engine, "results": results}
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        else:
            print(json.dumps(out, indent=1))
    torch.distributed.barrier()
    return 0
