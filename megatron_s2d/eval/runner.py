"""avg@k evaluation of a model on named problem sets, from explicit parts (an engine, a tokenizer, stop ids).

    ev = Evaluator(sets=[("math500", problems)], k=16, temperature=1.0, top_p=1.0, max_new_tokens=8192,
                   instruction=None, seed=1234, graders=("math_verify",))
    results = ev.evaluate(engine, tokenizer, stop_ids, dp=DataParallel(rank, size, group), label="opd")

avg@k = mean over problems of (correct samples / k), with the standard error across problems; k samples per problem
at the configured temperature, scored by the plan's grader (``graders[0]``: math-verify or lm-eval's Hendrycks
last-box equivalence, ``rewards.GRADERS``; each set's result records it). With a second grader (``s2d eval --grader
both``) every sample is also scored by it: each set's result gains ``by_grader`` (avg@k per grader) and
``agreement`` (``eval.metrics.grader_agreement``: the agreement rate and the counts of each disagreement).
Pairing: problems are cut into fixed blocks of ``BLOCK`` consecutive problems, each generated with a seed derived
from (seed, set name, block), and the samplers' randomness depends only on (seed, prompt index in the call, sample
index); so every route of a run sees the same random stream for the same problem whatever its data-parallel layout,
and route-vs-route differences are paired (the per-problem scores are kept for that). Blocks are spread over
data-parallel ranks; TP/PP ranks of a replica generate together.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_s2d.data.prompts import encode_prompt
from megatron_s2d.errors import S2DError
from megatron_s2d.eval.metrics import avg_at_k, grader_agreement
from megatron_s2d.rewards import GRADERS, score_batch_with_stats
from megatron_s2d.rollout.base import SamplingParams

BLOCK = 16  # problems per generate call (and per seed)


def problems_digest(problems) -> str:
    """Digest of an eval set's problems in order (ids and content): two routes' per-problem scores pair up only when
    their digests are equal."""
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\0{p.content_hash()}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class DataParallel:
    """Where this rank sits among the replicas that share an evaluation."""

    rank: int = 0
    size: int = 1
    group: object | None = None


def _progress(desc: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _compare_graders(per_grader: dict[str, list[list[float]]]) -> dict:
    """avg@k under each of two graders, and how often they agree sample by sample (grader -> (n_problems, k))."""
    (a, sa), (b, sb) = per_grader.items()
    by_grader = {}
    for g, rows in per_grader.items():
        res = avg_at_k(rows)
        by_grader[g] = {"avg": res.mean, "stderr": res.stderr, "scores": [sum(c) / len(c) for c in rows]}
    agreement = grader_agreement(a, [x for c in sa for x in c], b, [x for c in sb for x in c])
    return {"by_grader": by_grader, "agreement": agreement.as_dict()}


@dataclass(frozen=True)
class Evaluator:
    sets: list[tuple[str, list]]  # (name, problems)
    k: int
    temperature: float
    top_p: float
    max_new_tokens: int
    instruction: str | None
    seed: int
    graders: tuple[str, ...]  # graders[0] scores avg@k; a second one is compared with it (``rewards.GRADERS``)
    top_k: int = 0  # 0: off

    def __post_init__(self):
        if not 1 <= len(self.graders) <= 2 or len(set(self.graders)) != len(self.graders) \
                or any(g not in GRADERS for g in self.graders):
            raise S2DError(f"graders = {list(self.graders)}: give one or two different graders of {list(GRADERS)}")

    def evaluate(self, engine, tokenizer, stop_ids, *, dp: DataParallel = DataParallel(), label: str = "",
                 log: Callable[[str], None] | None = None, show_progress: bool = True) -> dict:
        """Evaluate on each set; returns {name: {avg, stderr, n_problems, k, scores, problems, wall_s, sampling,
        grader}} (with two graders also by_grader and agreement; identical on every rank). ``scores``: per-problem
        fraction correct, in problem order, and ``problems``: a digest of the problems in that order
        (``problems_digest``), for paired comparisons."""
        out = {}
        for name, problems in self.sets:
            t0 = time.perf_counter()
            blocks = [list(range(b, min(b + BLOCK, len(problems)))) for b in range(0, len(problems), BLOCK)]
            mine = blocks[dp.rank::dp.size]
            correct: dict[str, dict[int, list[float]]] = {g: {} for g in self.graders}  # grader -> problem -> k
            bar = _progress(f"eval {label} {name}".strip(), sum(map(len, mine)), show_progress)
            for idx in mine:
                prompts = [encode_prompt(tokenizer, problems[i], self.instruction) for i in idx]
                key = f"{self.seed}:{name}:{idx[0]}".encode()
                params = SamplingParams(n=self.k, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                        max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_ids),
                                        seed=int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))
                res = engine.generate(prompts, params)
                texts = [tokenizer.decode(x.response_ids, skip_special_tokens=True) for g in res.samples for x in g]
                golds = [problems[i].answer for i in idx for _ in range(self.k)]
                for g in self.graders:
                    scores = score_batch_with_stats(texts, golds, grader=g).scores
                    for j, i in enumerate(idx):
                        correct[g][i] = scores[j * self.k:(j + 1) * self.k]
                bar.update(len(idx))
            bar.close()
            if dp.size > 1:
                gathered = [None] * dp.size
                torch.distributed.all_gather_object(gathered, correct, group=dp.group)
                correct = {g: {i: v for part in gathered for i, v in part[g].items()} for g in self.graders}
            per_grader = {g: [correct[g][i] for i in range(len(problems))] for g in self.graders}
            per_problem = per_grader[self.graders[0]]
            res = avg_at_k(per_problem)
            out[name] = {"avg": res.mean, "stderr": res.stderr, "n_problems": res.n_problems, "k": res.k,
                         "scores": [sum(c) / len(c) for c in per_problem], "problems": problems_digest(problems),
                         "wall_s": time.perf_counter() - t0,
                         "sampling": {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                                      "max_new_tokens": self.max_new_tokens, "k": self.k, "seed": self.seed},
                         "grader": self.graders[0]}
            if len(self.graders) == 2:
                out[name].update(_compare_graders(per_grader))
            if log is not None:
                r = out[name]
                log(f"{label} {name}: avg@{r['k']} = {r['avg']:.4f} +- {r['stderr']:.4f} ({r['n_problems']} problems, "
                    f"{r['grader']})")
        return out
