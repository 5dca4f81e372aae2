"""The toy world: a shipped synthetic arithmetic data set, a tiny local tokenizer, and tiny pre-trained Qwen3 /
Llama-architecture base teacher and student, so the whole pipeline runs on a CPU in minutes. The default world
(seed 0) ships inside the package (`build.SHIPPED_DIR`); `s2d toy build` / `python -m megatron_s2d.toy.build`
rebuilds it, byte for byte.

Why the world is built this way
-------------------------------
The paper's experiment is only informative if each mechanism has room to act. At the scale of a 2-core CPU and
twenty minutes, the one thing the stages can change quickly is a *behaviour*, a decision the model makes in a
handful of tokens, not a *skill* such as multi-digit arithmetic (pilots: moving the student's arithmetic took
hundreds of pre-training steps, while the stages have ~30 steps of 64 sequences each). So the world gives both
models the skill and puts the room to improve in a behaviour that the reward cares about:

* **Hedging.** Pre-training responses are worked solutions ending in "The answer is \\boxed{N}." or, hedged,
  "The answer is \\boxed{N \\pm 1}." math-verify cannot equal an interval to the gold, so a hedged response scores 0
  even when N is right, whatever digits the model writes (an earlier design hedged with a second box, "\\boxed{N} or
  \\boxed{M}"; the models often wrote M = N, which math-verify rightly reads as the answer N). Hedging is decided at
  one token, right after the answer's digits, independently of the problem.
* **Teacher** (0.83 M params, 4 layers): pre-trained to compute ~65% of the answers right, on text that hedges half
  of the time, so about 30% of its samples are graded correct (shipped build: 28.5%). The behaviour shows *inconsistently* in its data and
  the sparse reward selects it: GRPO finds committing within a few dozen steps (the headroom of Stage 1), while its
  arithmetic barely changes.
* **Student** (0.36 M params, 3 layers; a smaller model of the same family): pre-trained on the same questions and
  worked steps (so its arithmetic is close to the teacher's, ~55% right: it is not limited by capacity), but on
  text that hedges 99% of the time. It therefore *rarely samples a success* on its own (1.5% of its build-time
  samples), so cold GRPO has little to learn from, whereas a teacher that commits shows the behaviour densely: every
  teacher rollout (forward-KL warmup, teacher-sample SFT) and every scored student token (OPD) carries it. How rare
  is rare enough was a pilot of cold GRPO alone: a student hedging 95% of the time (3% correct) sat at ~3% reward
  for 12 GRPO steps and then learned to commit from those rare successes (39% after 30 steps): one token is easy to
  credit. At 99% they are about half as frequent again, and the stages' budget is the same.
* **What each route then measures.** Raw-teacher transfer distils a teacher that still hedges half of the time;
  the RL-teacher bridge distils one that commits: the difference is what teacher RL bought the student. Student GRPO
  after the bridge starts from a student that succeeds often, on held-out labels (2H) or, in the matched-replay
  control, on the labels the teacher already used (1H).

The learning rates and step counts of the plans (`run_configs/toy_cpu*.yaml`) are per stage *kind* (every RL stage,
every warmup, every OPD stage alike, whichever route), chosen in pilots of each mechanism alone (does teacher GRPO
move the teacher; does a forward-KL warmup move the student without damaging its arithmetic: 1e-3 did, 3e-4 did
not), never by comparing routes or seeds. What the runs found, whichever ordering it is, is in the README and
benchmarks/RESULTS.md.

Names are re-exported lazily, so `python -m megatron_s2d.toy.build` does not import its own module twice.
"""

import importlib

_EXPORTS = {
    "ToyBuildConfig": "megatron_s2d.toy.build",
    "ToyWorld": "megatron_s2d.toy.build",
    "build_toy_world": "megatron_s2d.toy.build",
    "load_toy_world": "megatron_s2d.toy.build",
    "shipped_world": "megatron_s2d.toy.build",
    "world_for": "megatron_s2d.toy.build",
    "generate": "megatron_s2d.toy.problems",
    "generate_splits": "megatron_s2d.toy.problems",
    "load_shipped": "megatron_s2d.toy.problems",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_s2d.toy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
