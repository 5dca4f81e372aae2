"""avg@k evaluation of a model on named problem sets, from explicit parts (an engine, a tokenizer, stop ids).

    ev = Evaluator(sets=[("math500", problems)], k=16, temperature=1.0, top_p=1.0, max_new_tokens=8192,
                   instruction=None, seed=1234)
    results = ev.evaluate(engine, tokenizer, stop_ids, dp=DataParallel(rank, size, group), label="opd")

avg@k = mean over problems of (correct samples / k), with the standard error across problems; k samples per problem
at the configured temperature, scored by math-verify. Pairing: problems are cut into fixed blocks of ``BLOCK``
consecutive problems, each generated with a seed derived from (seed, set name, block), and the samplers' randomness
depends only on (seed, prompt index in the call, sample index); so every route of a run sees the same random stream
for the same problem whatever its data-parallel layout, and route-vs-route differences are paired (the per-problem
scores are kept for that). Blocks are spread over data-parallel ranks; TP/PP ranks of a replica generate together.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_s2d.data.prompts import encode_prompt
from megatron_s2d.eval.metrics import avg_at_k
from megatron_s2d.rewards import score_batch_with_stats
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


@dataclass(frozen=True)
class Evaluator:
    sets: list[tuple[str, list]]  # (name, problems)
    k: int
    temperature: float
    top_p: float
    max_new_tokens: int
    instruction: str | None
    seed: int

    def evaluate(self, engine, tokenizer, stop_ids, *, dp: DataParallel = DataParallel(), label: str = "",
                 log: Callable[[str], None] | None = None, show_progress: bool = True) -> dict:
        """Evaluate on each set; returns {name: {avg, stderr, n_problems, k, scores, problems, wall_s, sampling}}
        (identical on every rank). ``scores``: per-problem fraction correct, in problem order, and ``problems``: a
        digest of the problems in that order (``problems_digest``), for paired comparisons."""
        out = {}
        for name, problems in self.sets:
            t0 = time.perf_counter()
            blocks = [list(range(b, min(b + BLOCK, len(problems)))) for b in range(0, len(problems), BLOCK)]
            mine = blocks[dp.rank::dp.size]
            correct: dict[int, list[float]] = {}
            bar = _progress(f"eval {label} {name}".strip(), sum(map(len, mine)), show_progress)
            for idx in mine:
                prompts = [encode_prompt(tokenizer, problems[i], self.instruction) for i in idx]
                key = f"{self.seed}:{name}:{idx[0]}".encode()
                params = SamplingParams(n=self.k, temperature=self.temperature, top_p=self.top_p,
                                        max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_ids),
                                        seed=int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))
                res = engine.generate(prompts, params)
                texts = [tokenizer.decode(x.response_ids, skip_special_tokens=True) for g in res.samples for x in g]
                golds = [problems[i].answer for i in idx for _ in range(self.k)]
                scores = score_batch_with_stats(texts, golds).scores
                for j, i in enumerate(idx):
                    correct[i] = scores[j * self.k:(j + 1) * self.k]
                bar.update(len(idx))
            bar.close()
            if dp.size > 1:
                gathered = [None] * dp.size
                torch.distributed.all_gather_object(gathered, correct, group=dp.group)
                correct = {i: v for part in gathered for i, v in part.items()}
            per_problem = [correct[i] for i in range(len(problems))]
            res = avg_at_k(per_problem)
            out[name] = {"avg": res.mean, "stderr": res.stderr, "n_problems": res.n_problems, "k": res.k,
                         "scores": [sum(c) / len(c) for c in per_problem], "problems": problems_digest(problems),
                         "wall_s": time.perf_counter() - t0,
                         "sampling": {"temperature": self.temperature, "top_p": self.top_p,
                                      "max_new_tokens": self.max_new_tokens, "k": self.k, "seed": self.seed}}
            if log is not None:
                r = out[name]
                log(f"{label} {name}: avg@{r['k']} = {r['avg']:.4f} +- {r['stderr']:.4f} ({r['n_problems']} problems)")
        return out
