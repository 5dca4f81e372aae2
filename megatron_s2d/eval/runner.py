"""avg@k evaluation of a policy on the plan's eval sets (and of any checkpoint, for ``s2d eval``).

avg@k = mean over problems of (correct samples / k), with the standard error across problems; k samples per problem
at the configured temperature, scored by math-verify. Every policy of a run is evaluated with the same sampling seed
per problem, so route-vs-route comparisons are paired. Problems are spread over data-parallel ranks; TP ranks of a
group generate together.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION, build_prompt
from megatron_s2d.eval.metrics import avg_at_k
from megatron_s2d.rewards import score_batch_with_stats
from megatron_s2d.rollout.base import SamplingParams


def _progress(desc: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def evaluate_sets(engine, tokenizer, eval_sets: list[tuple[str, list]], *, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, stop_ids, instruction: str | None, seed: int, dp_rank: int = 0,
                  dp_size: int = 1, dp_group=None, show_progress: bool = True, chunk: int = 16) -> dict:
    """Evaluate on each (name, problems) set; returns {name: {avg, stderr, n_problems, k, ..., sampling}}."""
    out = {}
    for name, problems in eval_sets:
        t0 = time.perf_counter()
        mine = list(range(dp_rank, len(problems), dp_size))
        correct: dict[int, list[float]] = {}
        bar = _progress(f"eval {name}", len(mine), show_progress)
        for start in range(0, len(mine), chunk):
            idx = mine[start:start + chunk]
            prompts = [tokenizer(build_prompt(tokenizer, problems[i], instruction or DEFAULT_INSTRUCTION),
                                 add_special_tokens=False)["input_ids"] for i in idx]
            s = int.from_bytes(hashlib.sha256(f"{seed}:{name}:{start}".encode()).digest()[:4], "little")
            params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                    stop_token_ids=tuple(stop_ids), seed=s)
            res = engine.generate(prompts, params)
            texts = [tokenizer.decode(x.response_ids, skip_special_tokens=True) for g in res.samples for x in g]
            golds = [problems[i].answer for i in idx for _ in range(k)]
            scores = score_batch_with_stats(texts, golds).scores
            for j, i in enumerate(idx):
                correct[i] = scores[j * k:(j + 1) * k]
            bar.update(len(idx))
        bar.close()
        if dp_size > 1:
            gathered = [None] * dp_size
            torch.distributed.all_gather_object(gathered, correct, group=dp_group)
            correct = {i: v for part in gathered for i, v in part.items()}
        res = avg_at_k([correct[i] for i in range(len(problems))])
        out[name] = {"avg": res.mean, "stderr": res.stderr, "n_problems": res.n_problems, "k": res.k,
                     "wall_s": time.perf_counter() - t0,
                     "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                                  "k": k, "seed": seed}}
    return out


def load_eval_sets(plan) -> list[tuple[str, list]]:
    from megatron_s2d.pipeline.splits_io import load_source

    return [(e.name, load_source(e.source, e.limit)) for e in plan.data.eval]


def evaluate_policy(ctx, model, arch, label: str, tokenizer=None, stop_ids=None) -> dict:
    """Evaluate a live (stage) model with the plan's eval settings; collective over the stage's ranks."""
    from megatron.core import parallel_state as ps

    from megatron_s2d.rollout.megatron_sampler import MegatronSampler

    tokenizer = tokenizer or ctx.tokenizer
    stop_ids = stop_ids or ctx.stop_ids
    ev = ctx.plan.eval
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = MegatronSampler(model, arch, eos_token_ids=list(stop_ids), pad_token_id=pad)
    ctx.log(f"evaluating {label}: avg@{ev.k} on {', '.join(e.name for e in ctx.plan.data.eval)}")
    results = evaluate_sets(
        engine, tokenizer, load_eval_sets(ctx.plan), k=ev.k, temperature=ev.temperature, top_p=ev.top_p,
        max_new_tokens=ev.max_new_tokens, stop_ids=stop_ids, instruction=ctx.plan.data.instruction,
        seed=ctx.plan.seed, dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(), show_progress=ctx.dist.is_main)
    for name, r in results.items():
        ctx.log(f"{label} {name}: avg@{r['k']} = {r['avg']:.4f} +- {r['stderr']:.4f} ({r['n_problems']} problems)")
    return {"label": label, "results": results}
