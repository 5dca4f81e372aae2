"""The dry run's price model (launch.pricing): its arithmetic on hand-computable inputs, the placement formulas, the
placement rule, a sanity check against NeMo-RL's published async figures, the separate side of the memory estimate,
and the priced table of the 70B recipe under both placements (and when a job does not fit)."""

import io
import re
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_s2d.config import ModelConfig, load_plan
from megatron_s2d.errors import S2DError
from megatron_s2d.launch import price_constants as C
from megatron_s2d.launch import pricing as P
from megatron_s2d.launch.checks import MemoryBudgetError, resolve_arch
from megatron_s2d.launch.experiment import launch_plan
from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.models.memory import estimate_separate_memory, estimate_stage_memory
from tests.unit.launch._plans import load, two_stage_plan, write_hf

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE_70B = REPO_ROOT / "run_configs" / "llama3.3_70b_to_llama3.1_8b.yaml"

# round numbers, so every figure below is computed by hand
DEV = replace(C.H100, name="test", peak_flops=1e12, mem_bytes_per_s=1e9, decode_bw_efficiency=1.0, train_mfu=0.5,
              score_mfu=0.25, fp8_train_speedup=1.5, fp8_score_speedup=2.0, sampler_step_s_per_layer=0.25,
              sampler_row_step_s=0.05, reward_s_per_sample=0.1, reward_workers_per_rank=2,
              intra_node_bytes_per_s=100.0, inter_node_bytes_per_s=10.0, link_efficiency=0.5,
              engine_load_bytes_per_s=40.0, job_startup_s=7.0)
# 2 layers, hidden 8, 2 heads of 4 (1 KV head), ffn 16, vocab 16, untied: per layer attention 8*8 + 2*8*4 + 8*8 =
# 192, MLP 3*8*16 = 384, norms 16 -> 592; x 2 + embeddings 2*16*8 = 256 + final norm 8 = 1,448 parameters.
# KV bytes per token (bf16): 2 (k, v) x 2 layers x 1 head x 4 x 2 bytes = 32.
TINY = ArchSpec("llama", 16, 8, 16, 2, 2, 1, 4, 1e-5, 1e4, 64, False, False)


def test_tiny_arch_is_what_the_comments_say():
    assert TINY.num_params == 1448


def test_train_and_forward_seconds():
    # 6 x 1e9 params x 1000 tokens = 6e12 FLOPs over 2 GPUs x 1e12 x 0.5
    assert P.train_s(DEV, 10**9, 1000, 2, ModelConfig()) == pytest.approx(6.0)
    assert P.train_s(DEV, 10**9, 1000, 2, ModelConfig(recompute=True)) == pytest.approx(8.0)  # x 4/3
    assert P.train_s(DEV, 10**9, 1000, 2, ModelConfig(fp8="tensorwise")) == pytest.approx(4.0)  # / 1.5
    # 2 x 1e9 x 1000 = 2e12 over 2 x 1e12 x 0.25; FP8 / 2
    assert P.forward_s(DEV, 10**9, 1000, 2, ModelConfig()) == pytest.approx(4.0)
    assert P.forward_s(DEV, 10**9, 1000, 2, ModelConfig(fp8="tensorwise")) == pytest.approx(2.0)
    # 40 responses over 2 ranks x 0.1 s / 2 workers
    assert P.reward_s(DEV, 40, 2) == pytest.approx(1.0)


def test_decode_step_is_bound_by_bytes_or_flops_plus_the_samplers_fixed_cost():
    vllm = P.Engine(TINY, 2, 1, 1, sampler=False, max_rows=100)
    # no rows: the weights alone, 1,448 x 2 = 2,896 bytes at 1e9 B/s
    assert P.decode_step_s(DEV, vllm, 0, 0) == pytest.approx(2896 / 1e9)
    # 10 rows at context 20: bytes 2,896 + 10 x 20 x 32 = 9,296 -> 9.296e-6 s; FLOPs 10 x (2 x 1,448 + 4 x 2 layers x
    # 8 (q width) x 20) = 41,760 -> 41,760 / (1e12 x 0.25) = 1.67e-7 s: memory-bound
    assert P.decode_step_s(DEV, vllm, 10, 20) == pytest.approx(9296 / 1e9)
    slow = replace(DEV, mem_bytes_per_s=1e12, peak_flops=1e5)  # now FLOP-bound: 41,760 / (1e5 x 0.25)
    assert P.decode_step_s(slow, vllm, 10, 20) == pytest.approx(41760 / 25000)
    sampler = replace(vllm, sampler=True)  # + 2 layers x 0.25 + 10 rows x 0.05
    assert P.decode_step_s(DEV, sampler, 10, 20) == pytest.approx(9296 / 1e9 + 0.5 + 0.5)
    tp2 = replace(vllm, tp=2)  # weights split over 2 GPUs; the one KV head is replicated: 1,448 + 6,400 bytes
    assert P.decode_step_s(DEV, tp2, 10, 20) == pytest.approx(7848 / 1e9)


def test_generation_continuous_vs_static_chunks():
    ln = P.Lengths(prompt=10, response=10, max_new=30)
    ctx = 10 + 10 / 2
    vllm = P.Engine(TINY, 2, 1, 1, sampler=False, max_rows=50)
    prefill = 100 * 10 * 2 * 1448 / (1e12 * 0.25)  # rows x prompt tokens x 2 x params at score_mfu
    # 100 rows x 10 tokens / 50 at once = 20 steps < max_new 30: the longest response bounds it; 1,000 tokens over
    # 30 steps = 33.3 active rows per step
    assert P.generate_s(DEV, vllm, 100, ln) == pytest.approx(prefill + 30 * P.decode_step_s(DEV, vllm, 100 / 3, ctx))
    # 400 rows: 4,000 tokens / 50 = 80 steps at 50 rows
    assert P.generate_s(DEV, vllm, 400, ln) == pytest.approx(4 * prefill + 80 * P.decode_step_s(DEV, vllm, 50, ctx))
    sampler = replace(vllm, sampler=True, max_rows=40)  # 3 chunks of <= 40 rows, 30 steps each: 90 steps
    assert P.generate_s(DEV, sampler, 100, ln) == pytest.approx(prefill + 90 * P.decode_step_s(DEV, sampler,
                                                                                                 1000 / 90, ctx))
    assert P.generate_s(DEV, vllm, 0, ln) == 0.0


@pytest.fixture
def small(tmp_path):
    """teacher_rl -> opd on 1 node x 8 GPUs (tp 2), 8 prompts x 4 samples, 100-token responses (hf: SMALL_LLAMA)."""
    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf), ["stage_defaults.steps=10"])
    return plan, {r: resolve_arch(plan, r)[0] for r in ("teacher", "student")}


def test_sync_seconds(small):
    plan, archs = small
    stage = plan.stages[0]  # teacher_rl on the megatron sampler
    p = archs["teacher"].num_params * 2 / 2  # bf16 weights / tp 2: what one engine GPU holds
    assert P.sync_s(plan, stage, archs, DEV, 0) == 0.0  # the colocated sampler uses the trainer's weights
    # separate, 4 generation ranks = 2 replicas of tp 2 within the node: to replica 0, then its broadcast
    assert P.sync_s(plan, stage, archs, DEV, 4) == pytest.approx(2 * p / (100 * 0.5))
    assert P.sync_s(plan, stage, archs, DEV, 2) == pytest.approx(p / (100 * 0.5))  # one replica: no broadcast
    stage.rollout.engine = "vllm"  # colocated vLLM (tp 2 = the model's, pp 1): nothing crosses a link; it loads
    assert P.sync_s(plan, stage, archs, DEV, 0) == pytest.approx(p / 40)
    plan.models["teacher"].pp = 2  # now half of each vLLM rank's layers come from the other pipeline stage
    assert P.sync_s(plan, stage, archs, DEV, 0) == pytest.approx(p / 2 / (100 * 0.5) + p / 40)
    # separate across 2 nodes, the sampler at tp 2 pp 2 (a GPU holds a quarter): 8 generation ranks = 2 replicas,
    # IB to replica 0, then NVLink within the generation ranks' node
    plan.launch.nodes = 2
    stage.rollout.engine = "megatron"
    assert P.sync_s(plan, stage, archs, DEV, 8) == pytest.approx(p / 2 / (10 * 0.5) + p / 2 / (100 * 0.5))
    assert P.sync_s(plan, stage, archs, DEV, 4) == pytest.approx(p / 2 / (10 * 0.5))  # one replica


def test_a_frozen_generating_teacher_syncs_nothing(tmp_path):
    hf = write_hf(tmp_path / "m")
    d = two_stage_plan(tmp_path, hf, hf)
    d["stages"] = [{"name": "fkl", "kind": "fkl_warmup", "teacher": "base", "split": "1H"}]
    plan = load(tmp_path, d)
    archs = {r: resolve_arch(plan, r)[0] for r in ("teacher", "student")}
    assert P.sync_s(plan, plan.stages[0], archs, DEV, 4) == 0.0
    price = P.price_stage(plan, plan.stages[0], archs, "separate", 4, DEV)
    assert price.phases.sync == 0.0 and price.phases.score == 0.0 and price.phases.reward == 0.0
    assert price.train_layout == "s:2/1/2"  # the teacher only generates: it is not on the trainers
    train, gen = estimate_separate_memory(plan, plan.stages[0], archs, 4)
    colocated = estimate_stage_memory(plan, plan.stages[0], archs)
    assert colocated.frozen_gib > 0 and train.frozen_gib == 0  # ... nor in their memory: the generation ranks hold it
    assert gen.weights_gib == pytest.approx(colocated.frozen_gib)  # the teacher at its tp 2 (same shape as the student)


def test_step_wall_and_gpu_hours_per_placement(small):
    plan, archs = small
    stage = plan.stages[0]  # teacher_rl: generate, score (old log-probs), reward, train; sampler: no sync
    colo = P.price_stage(plan, stage, archs, "colocated", 0, DEV)
    ph = colo.phases
    assert ph.generate > 0 and ph.score > 0 and ph.reward > 0 and ph.train > 0 and ph.sync == 0
    assert colo.step_s == pytest.approx(ph.generate + ph.score + ph.reward + ph.train)
    # eval of the final policy: eval.include_base false, data.eval = math500 (500 problems) x eval.k 16 rows
    assert colo.eval_s > 0 and colo.once_s == 0
    assert colo.wall_s == pytest.approx(7.0 + 10 * colo.step_s + colo.eval_s)
    assert colo.gpu_hours == pytest.approx(8 * colo.wall_s / 3600)
    sep = P.price_stage(plan, stage, archs, "separate", 4, DEV)  # 4 generate (2 replicas), 4 train (dp 2)
    # training, scoring and grading run on half the GPUs: twice the time
    assert sep.phases.train == pytest.approx(2 * ph.train) and sep.phases.score == pytest.approx(2 * ph.score)
    assert sep.phases.reward == pytest.approx(2 * ph.reward)
    assert sep.phases.generate > ph.generate  # 16 rows per replica instead of 8
    rest = sep.phases.score + sep.phases.reward + sep.phases.train + sep.phases.sync
    assert sep.step_s == pytest.approx(sep.phases.generate + rest)  # max_staleness 0: serial
    assert sep.gpu_hours == pytest.approx(8 * sep.wall_s / 3600) and sep.train_gpus == 4
    stage.rollout.max_staleness = 1
    piped = P.price_stage(plan, stage, archs, "separate", 4, DEV)
    assert piped.step_s == pytest.approx(max(sep.phases.generate, rest))
    assert piped.once_s == pytest.approx(sep.phases.generate)  # the first batch fills the pipeline
    assert piped.wall_s == pytest.approx(7.0 + 10 * piped.step_s + piped.once_s + piped.eval_s)


def test_choose_placement_rule(small):
    plan, archs = small
    stage = plan.stages[0]
    # 8 GPUs, tp 2: N = 2 leaves 6 trainers (dp 3), which 8 prompts do not divide
    assert P.separate_candidates(plan, stage) == [4, 6]
    assert P.choose_placement(plan, stage, archs, DEV) == ("colocated", 0)  # on-policy: serial, fewer GPUs each
    # pipelined (max_staleness 1), 100 steps, no final evaluation (it would run on the trainers alone), training as
    # slow as a sixth of generation: N = 6 generate (3 replicas) while 2 train beats taking turns on all 8; N = 4
    # (2 replicas, 16 rows each at the sampler's per-row cost) does not
    heavy = replace(DEV, sampler_step_s_per_layer=0.05, train_mfu=0.1, intra_node_bytes_per_s=1e11)
    stage.rollout.max_staleness, stage.eval, stage.steps = 1, False, 100
    colo = P.price_stage(plan, stage, archs, "colocated", 0, heavy)
    four, six = (P.price_stage(plan, stage, archs, "separate", m, heavy) for m in (4, 6))
    assert six.gpu_hours < colo.gpu_hours < four.gpu_hours
    assert P.choose_placement(plan, stage, archs, heavy) == ("separate", 6)
    assert P.best_separate(plan, stage, archs, heavy) == six
    stage.rollout.placement, stage.rollout.generation_ranks = "auto", 0
    assert P.placement_of(plan, stage, archs) == P.choose_placement(plan, stage, archs)


def test_auto_placement_is_resolved_into_the_plan_with_its_reason(small, monkeypatch):
    """``placement: auto``: the launcher writes the choice into the plan every job reads, with a line saying why;
    a choice that leaves ``max_staleness`` > 0 colocated is refused, naming the field."""
    plan, archs = small
    heavy = replace(DEV, sampler_step_s_per_layer=0.05, train_mfu=0.1, intra_node_bytes_per_s=1e11)
    rl = plan.stages[0]
    rl.rollout.placement, rl.rollout.max_staleness, rl.eval, rl.steps = "auto", 1, False, 100
    resolved, notes = P.resolve_placements(plan, archs, heavy)
    got = resolved.stages[0].rollout
    assert (got.placement, got.generation_ranks) == ("separate", 6) and plan.stages[0].rollout.placement == "auto"
    assert len(notes) == 1 and notes[0].startswith(f"stages.{rl.name}.rollout.placement: auto -> separate, 6 "
                                                   "generation ranks (priced: colocated ")
    assert resolved.stages[1] is plan.stages[1]  # not auto: untouched
    # on the default device colocated is cheaper; at max_staleness 1 (ranks of its own only) auto chooses N alone
    resolved, notes = P.resolve_placements(plan, archs, DEV)
    assert resolved.stages[0].rollout.generation_ranks == P.best_separate(plan, rl, archs, DEV).generation_ranks
    rl.rollout.max_staleness = 0
    resolved, notes = P.resolve_placements(plan, archs, DEV)
    assert resolved.stages[0].rollout.placement == "colocated" and "auto -> colocated (priced: " in notes[0]
    # generation ahead asked for, and no split possible (here: none offered): refused, naming the field
    rl.rollout.max_staleness = 1
    monkeypatch.setattr(P, "separate_candidates", lambda plan, stage: [])
    with pytest.raises(S2DError, match=rf"stages.{rl.name}.rollout.max_staleness = 1: running generation ahead"):
        P.resolve_placements(plan, archs, DEV)


def test_separate_memory_sides(small):
    plan, archs = small
    opd = plan.stages[1]
    colo = estimate_stage_memory(plan, opd, archs)
    train, gen = estimate_separate_memory(plan, opd, archs, 4)
    # trainers: dp 2 instead of 4 shards the (distributed) optimizer half as far; the scoring teacher stays
    assert train.optim_gib == pytest.approx(2 * colo.optim_gib) and train.frozen_gib == colo.frozen_gib
    assert train.vllm is None and train.sampler is None and train.eval_sampler is not None
    # a generation GPU: the student's sampler copy and its KV cache only
    assert not gen.trains and gen.grads_gib == gen.optim_gib == gen.frozen_gib == 0
    assert gen.weights_gib == pytest.approx(colo.weights_gib) and gen.sampler is not None
    assert gen.gen_peak_gib == pytest.approx(gen.weights_gib + gen.overhead_gib + gen.sampler.total_gib)
    assert train.fits and gen.fits


def test_sanity_against_nemo_rl_published_async(tmp_path):
    """NeMo-RL's Llama-3.1-8B GRPO on 16 H100 (price_constants: 92.8 s per step on-policy, colocated at PP2 with
    recompute and a reference KL; 64.8 s one step off-policy on 8 + 8 GPUs at PP1): the model's step times at their
    settings and mean lengths stay within 30% of both (measured: benchmarks/RESULTS.md, "Price model")."""
    d = {"name": "nemo", "run_dir": str(tmp_path / "run"), "data": {"max_prompt_tokens": 512},
         "models": {r: {"hf": "/x/Llama-3.1-8B", "tp": 1, "pp": 2, "recompute": True} for r in ("teacher", "student")},
         "eval": {"include_base": False, "engine": "megatron", "max_new_tokens": 100},
         "stages": [{"name": "grpo", "kind": "student_rl", "split": "2H", "prompts_per_step": 64,
                     "samples_per_prompt": 32, "updates_per_step": 4, "micro_batch_tokens": 4096, "eval": False,
                     "grpo": {"kl_beta": 0.01},
                     "rollout": {"engine": "vllm", "max_new_tokens": 3584, "vllm": {"gpu_memory_utilization": 0.6}}}],
         "launch": {"executor": "slurm", "nodes": 2, "procs_per_node": 8, "gpu_memory_gib": 79,
                    "slurm": {"account": "a", "partition": "p", "job_dir": str(tmp_path / "jobs")}}}
    plan = load(tmp_path, d)
    archs = {r: resolve_arch(plan, r)[0] for r in ("teacher", "student")}
    stage = plan.stages[0]
    on = P.price_stage(plan, stage, archs, "colocated", 0, C.H100, P.Lengths(130, C.NEMO_RL_LLAMA8B_MEAN_RESPONSE,
                                                                               3584))
    assert on.step_s == pytest.approx(C.NEMO_RL_LLAMA8B_ONPOLICY_STEP_S, rel=0.3)
    # their one-step-off recipe: PP1, 8 GPUs of vLLM at utilization 0.8 (set after loading: this release's plans
    # serve separate generation on the megatron sampler only)
    plan.models["student"].pp = 1
    stage.rollout.placement, stage.rollout.generation_ranks, stage.rollout.max_staleness = "separate", 8, 1
    stage.rollout.vllm.gpu_memory_utilization = 0.8
    off = P.price_stage(plan, stage, archs, "separate", 8, C.H100, P.Lengths(130, 1123, 3584))
    assert off.step_s == pytest.approx(C.NEMO_RL_LLAMA8B_ONE_OFF_STEP_S, rel=0.3)
    ph = off.phases
    assert off.step_s == max(ph.generate, ph.score + ph.reward + ph.train + ph.sync)


def _table(out: str) -> list[str]:
    """The price table's lines, header to the total line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ") and " side " in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("total: "))
    return lines[start:end + 1]


def _gpu_h(line: str) -> float:
    return float(re.split(r"\s{2,}", line.strip())[8].rstrip("!"))


def test_70b_recipe_priced_under_both_placements(tmp_path):
    stages = ["teacher_rl", "opd", "student_rl"]
    run = [f"run_dir={tmp_path / 'run'}", f"launch.slurm.job_dir={tmp_path / 'jobs'}"]
    out = io.StringIO()
    colo_plan = load_plan(RECIPE_70B, run)
    colo = launch_plan(colo_plan, str(tmp_path / "run" / "plan.resolved.yaml"), stages, executor="slurm",
                       dry_run=True, out=out)
    table = _table(out.getvalue())
    assert "dry run OK" in out.getvalue() and table[-1] == out.getvalue().split("\n[s2d]")[0].splitlines()[-1]
    rows = {line.split()[0]: line for line in table[2:] if line.split()[0] in stages}
    prices = {c.job.name: c.price for c in colo.checks}
    for s in stages:  # the other placement: separate at its cheapest possible N
        assert re.split(r"\s{2,}", rows[s])[1:3] == ["all", "colocated"]
        n = prices[s].other.generation_ranks
        assert n in P.separate_candidates(colo_plan, next(x for x in colo_plan.stages if x.name == s))
        assert f"sep N={n}: " in rows[s]
    total = float(re.match(r"total: ([\d.]+) GPU-hours \(3 jobs\)", table[-1]).group(1))
    assert total == pytest.approx(sum(p.gpu_hours for p in prices.values()), abs=0.1)
    assert all(p.gpus == 32 and p.gpu_hours == pytest.approx(32 * p.wall_s / 3600) for p in prices.values())
    # the same stages separate: 16 of the 32 GPUs generate (the megatron sampler: this release's separate engine);
    # student_rl one step off-policy
    sep_overrides = [f"stages.{s}.rollout.{k}" for s in ("opd", "student_rl")
                     for k in ("placement=separate", "generation_ranks=16", "engine=megatron")]
    out = io.StringIO()
    sep = launch_plan(load_plan(RECIPE_70B, run + sep_overrides + ["stages.student_rl.rollout.max_staleness=1"]),
                      str(tmp_path / "run" / "plan.resolved.yaml"), stages, executor="slurm", dry_run=True, out=out)
    text = out.getvalue()
    for s in ("opd", "student_rl"):  # the memory table: one row per side
        assert re.search(rf"^{s} \[train\]\s+2\s+16\s+s:2/1/8 ", text, re.M), text
        assert re.search(rf"^{s} \[gen\]\s+2\s+16\s+s:2/1/8\s+s:8\.03B\s+sampler s:2/1x8 ", text, re.M)
    table = _table(text)
    sides = {(line.split()[0], line.split()[1]): line for line in table[2:] if line.split()[0] in stages}
    prices = {c.job.name: c.price for c in sep.checks}
    for s, k in (("opd", 0), ("student_rl", 1)):
        p = prices[s]
        assert (p.placement, p.generation_ranks, p.max_staleness, p.train_gpus) == ("separate", 16, k, 16)
        assert f"separate k={k}" in sides[(s, "train")] and "coloc: " in sides[(s, "train")]
        # the job's GPU-hours split by side: 16 + 16 of the 32 GPUs
        assert _gpu_h(sides[(s, "train")]) + _gpu_h(sides[(s, "gen")]) == pytest.approx(p.gpu_hours, abs=0.2)
        assert (p.other.placement, p.other.gpus, p.other.generation_ranks) == ("colocated", 32, 0)
        assert f"coloc: {P._h(p.other.gpu_hours)}" in sides[(s, "train")]
    assert sides[("teacher_rl", "all")].split()[2] == "colocated"
    assert prices["student_rl"].step_s == pytest.approx(max(prices["student_rl"].phases.generate, sum(
        (prices["student_rl"].phases.score, prices["student_rl"].phases.reward, prices["student_rl"].phases.train,
         prices["student_rl"].phases.sync))))
    total = float(re.match(r"total: ([\d.]+) GPU-hours", table[-1]).group(1))
    assert total == pytest.approx(sum(p.gpu_hours for p in prices.values()), abs=0.1)


def test_over_budget_job_is_priced_flagged_then_fails(tmp_path):
    """The 70B recipe on 2 nodes: the teacher's unsharded optimizer does not fit. The dry run prints the memory
    table and the priced table, the job flagged with its total, then fails naming the problem."""
    plan = load_plan(RECIPE_70B, [f"run_dir={tmp_path / 'run'}", f"launch.slurm.job_dir={tmp_path / 'jobs'}",
                                  "launch.nodes=2"])
    out = io.StringIO()
    with pytest.raises(MemoryBudgetError, match=r"stages.teacher_rl: the training phase needs"):
        launch_plan(plan, str(tmp_path / "run" / "plan.resolved.yaml"), ["teacher_rl", "opd"], executor="slurm",
                    dry_run=True, out=out)
    text = out.getvalue()
    table = _table(text)
    row = next(line for line in table if line.startswith("teacher_rl "))
    assert re.split(r"\s{2,}", row)[8].endswith("!") and "does not fit its GPUs: teacher_rl)" in text
    assert not re.split(r"\s{2,}", next(line for line in table if line.startswith("opd ")))[8].endswith("!")
    assert re.match(r"total: [\d.]+ GPU-hours \(2 jobs\)", table[-1]) and "dry run OK" not in text
