"""``s2d eval``: avg@k of any checkpoint (megatron-s2d checkpoint or HF folder) on named or local data sets.

Under torchrun with ``--tp N`` the megatron engine runs tensor-parallel; problems are spread over data-parallel
ranks. With ``--engine vllm`` an HF folder is served by vLLM directly (a megatron checkpoint is exported to HF first).
Output: a table on stdout and, with ``--out``, JSON with the sampling parameters and the grader recorded.
``--grader both`` scores every sample with math-verify and with lm-eval's Hendrycks last box: the table has a row per
grader, and a line per data set says how often they agree (and how many samples only one of them calls correct).

Everything that can be wrong with the arguments is refused before a model is loaded: ``--out`` (a folder, or a file
in a missing or unwritable folder, would lose the evaluation at its end), the data (``--schema``, and ``--strict``,
which refuses a malformed row instead of skipping it), and the token budget: ``--max-new-tokens`` defaults to what
the model's context leaves after the longest prompt, and a larger value is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from megatron_s2d.errors import S2DError, read_json


def _model_format(model_dir: Path) -> str:
    """'megatron' (a megatron-s2d checkpoint: s2d_model.json) or 'hf' (config.json)."""
    if (model_dir / "s2d_model.json").is_file():
        return "megatron"
    if (model_dir / "config.json").is_file():
        return "hf"
    raise S2DError(f"--model {model_dir}: neither a megatron-s2d checkpoint (s2d_model.json) nor an HF folder "
                   "(config.json)")


def _as_megatron(model_dir: Path, tmp: Path) -> Path:
    if _model_format(model_dir) == "megatron":
        return model_dir
    from megatron_s2d.checkpoint.hf_to_megatron import convert_hf_to_megatron

    out = tmp / "megatron"
    convert_hf_to_megatron(model_dir, out)
    return out


def _as_hf(model_dir: Path, tmp: Path) -> Path:
    if _model_format(model_dir) == "hf":
        return model_dir
    from megatron_s2d.checkpoint.megatron_to_hf import convert_megatron_to_hf

    out = tmp / "hf"
    convert_megatron_to_hf(model_dir, out)
    return out


def check_out(out: str | None) -> Path | None:
    """``--out``: a file path whose folder exists and can be written (checked before the evaluation runs)."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise S2DError(f"--out {out}: is a folder; give the path of a JSON file, e.g. {path / 'eval.json'}")
    folder = path.absolute().parent
    if not folder.is_dir():
        what = "is a file, not a folder: move it away" if folder.exists() else "does not exist: create it"
        raise S2DError(f"--out {out}: its folder {folder} {what}, or give another path")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise S2DError(f"--out {out}: cannot write there (permission denied, or a read-only filesystem): give "
                       "another path")
    return path


def max_new_tokens(requested: int | None, context: int, prompt_lens: dict[str, int]) -> int:
    """The response budget: ``requested``, or (None) what the model's ``context`` leaves after the longest prompt
    (``prompt_lens``: each data set's longest prompt, in tokens). A budget that does not fit is refused."""
    name, longest = max(prompt_lens.items(), key=lambda kv: kv[1])
    room = context - longest
    if room < 1:
        raise S2DError(f"--data {name}: its longest prompt ({longest} tokens) fills the model's {context}-token "
                       "context: nothing is left for a response (use a model with a longer context, or --limit)")
    if requested is None:
        return room
    if requested < 1:
        raise S2DError(f"--max-new-tokens = {requested}: must be >= 1")
    if requested > room:
        raise S2DError(f"--max-new-tokens = {requested}: the longest prompt ({longest} tokens, in {name}) leaves "
                       f"{room} of the model's {context}-token context: use at most {room} (the default)")
    return requested


def _context_and_tokenizer(model_dir: Path):
    """(the model's context length, its tokenizer), from its config and tokenizer files alone (no weights)."""
    from transformers import AutoTokenizer

    if _model_format(model_dir) == "megatron":
        from megatron_s2d.checkpoint.model_ckpt import read_model_meta

        arch, tok_dir = read_model_meta(model_dir)[0], model_dir / "tokenizer"
    else:
        from megatron_s2d.models.arch import load_arch

        arch, tok_dir = load_arch(model_dir), model_dir
    return arch.max_position_embeddings, AutoTokenizer.from_pretrained(str(tok_dir))


def _write_results(path: Path | None, out: dict) -> None:
    text = json.dumps(out, indent=1)
    if path is None:
        print(text)
        return
    try:
        path.write_text(text)
    except OSError as e:  # checked at the start; the folder changed meanwhile: keep the results on stdout
        print(text)
        raise S2DError(f"--out {path}: could not write the results ({e}); they are printed above") from e


def graders_of(choice: str) -> tuple[str, ...]:
    """``--grader``: the graders the Evaluator runs, the one that scores avg@k first."""
    return ("math_verify", "hendrycks_boxed") if choice == "both" else (choice,)


def results_table(results: dict, k: int) -> str:
    """The markdown table ``s2d eval`` prints (a row per data set and grader), then the graders' agreement lines."""
    lines = [f"| data | grader | avg@{k} | stderr | problems |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for grader, g in r.get("by_grader", {r["grader"]: r}).items():
            lines.append(f"| {name} | {grader} | {100 * g['avg']:.2f} | {100 * g['stderr']:.2f} | {r['n_problems']} |")
    for name, r in results.items():
        if "agreement" in r:
            a = r["agreement"]
            (ga, na), (gb, nb) = a["correct_only_by"].items()
            lines.append(f"{name}: graders agree on {100 * a['agreement_rate']:.1f}% of {a['n_samples']} samples "
                         f"(correct only by {ga}: {na}, only by {gb}: {nb})")
    return "\n".join(lines)


def main(args) -> int:
    if args.k < 1:
        raise S2DError(f"--k = {args.k}: must be >= 1")
    out_path = check_out(args.out)  # first: before anything is read
    from megatron_s2d.data.prompts import encode_prompt
    from megatron_s2d.data.sources import load_source

    model_dir = Path(args.model)
    context, tokenizer = _context_and_tokenizer(model_dir)
    sets = [(name, load_source(name, args.limit, schema=args.schema, strict=args.strict)) for name in args.data]
    budget = max_new_tokens(args.max_new_tokens, context, {
        name: max(len(encode_prompt(tokenizer, p)) for p in problems) for name, problems in sets})

    import torch  # the checks above need no model, no torch.distributed
    from transformers import AutoTokenizer

    from megatron_s2d.config import ModelConfig, RolloutConfig
    from megatron_s2d.eval.runner import DataParallel, Evaluator
    from megatron_s2d.runtime.dist import data_parallel_group, init_distributed

    info = init_distributed(args.tp, 1, seed=args.seed)
    evaluator = Evaluator(sets=sets, k=args.k, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=budget, instruction=None, seed=args.seed, graders=graders_of(args.grader))
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.engine == "vllm":
            from megatron_s2d.rollout.vllm_engine import VLLMEngine

            hf = _as_hf(model_dir, tmp)
            tokenizer = AutoTokenizer.from_pretrained(str(hf))
            engine = VLLMEngine(str(hf), seed=args.seed)
            gen_cfg = read_json(hf / "generation_config.json") if (hf / "generation_config.json").is_file() else {}
            stop = gen_cfg.get("eos_token_id", tokenizer.eos_token_id)
            stop = tuple(stop) if isinstance(stop, list) else (stop,)
        else:
            from megatron_s2d.checkpoint.assets import ModelAssets
            from megatron_s2d.policy.load import load_model
            from megatron_s2d.rollout.factory import make_sampler

            assets = ModelAssets.load(_as_megatron(model_dir, tmp))
            loaded = load_model(assets.path, ModelConfig(tp=args.tp, dtype=assets.meta["dtype"]), assets=assets,
                                seed=args.seed)
            tokenizer, stop = assets.tokenizer, assets.stop_ids
            engine = make_sampler(loaded.model, stop_ids=stop, pad_id=assets.pad_id,
                                  max_batch_tokens=RolloutConfig().max_batch_tokens)  # "auto": from free memory
        results = evaluator.evaluate(engine, tokenizer, stop, dp=DataParallel(info.dp_rank, info.dp,
                                                                             data_parallel_group()),
                                     show_progress=info.is_main)
        engine.close()
    if info.is_main:
        print(results_table(results, args.k))
        _write_results(out_path, {"model": str(model_dir), "engine": args.engine, "results": results})
    torch.distributed.barrier()
    return 0
