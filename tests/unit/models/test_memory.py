"""The two-phase memory model against numbers worked out by hand for SMALL_LLAMA (h=1024, L=4, 8 heads / 2 kv heads
of 128, ffn 4096, vocab 32000, untied), in the two-stage plan of tests/unit/launch/_plans.py: both models at tp=2,
bf16, 1 node x 8 GPUs (dp=4), micro_batch_tokens 1000, rollout and eval max_new_tokens 100, data.max_prompt_tokens
1024 (the default), launch.gpu_memory_gib 80 (the default)."""

import pytest

from megatron_s2d.config import GRPOStageConfig
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import load_arch
from megatron_s2d.models.memory import (
    CUDA_CONTEXT_NCCL_GIB, GIB, HEADROOM_GIB, VLLM_CUDA_GRAPH_GIB, estimate_base_eval_memory, estimate_stage_memory,
    params_on_heaviest_stage, vllm_memory_fraction,
)
from tests.unit.launch._plans import load, two_stage_plan, write_hf

# per layer: attention 1024*1024 (q) + 2*1024*256 (k, v) + 1024*1024 (o) + MLP 3*1024*4096 + two norms 2*1024
PER_LAYER = 1024 * 1024 + 2 * 1024 * 256 + 1024 * 1024 + 3 * 1024 * 4096 + 2 * 1024  # 15,206,400
EMB = 32000 * 1024
TOTAL = 4 * PER_LAYER + 2 * EMB + 1024  # untied input + output embedding, final norm
P = TOTAL / 2  # parameters per GPU at tp=2, pp=1
# saved activation elements per token per layer: 4h outside the TP regions, 2q + 2kv + 3f inside them
OUTSIDE_TP = 4 * 1024
INSIDE_TP = 2 * 1024 + 2 * 256 + 3 * 4096  # 14,848
LOGITS = 1000 * 32000 / 2 * 10  # micro-batch tokens x vocab / tp x 10 bytes (bf16 + fp32 copy + fp32 softmax)
MAX_MODEL_LEN = 1024 + 100  # data.max_prompt_tokens + max_new_tokens
OVERHEAD = CUDA_CONTEXT_NCCL_GIB * GIB


@pytest.fixture()
def setup(tmp_path):
    hf = write_hf(tmp_path / "small")
    arch = load_arch(hf)
    return tmp_path, hf, {"teacher": arch, "student": arch}


def _plan(setup, overrides=()):
    tmp, hf, _ = setup
    return load(tmp, two_stage_plan(tmp, hf, hf), list(overrides))


def test_param_count_and_stage_split(setup):
    arch = setup[2]["teacher"]
    assert arch.num_params == TOTAL == 126_362_624
    assert params_on_heaviest_stage(arch, tp=2, pp=1) == P
    # pp=2: two layers + one embedding matrix (+ the final norm on the last stage)
    assert params_on_heaviest_stage(arch, tp=1, pp=2) == 2 * PER_LAYER + EMB + 1024


def test_training_phase_by_hand(setup):
    """teacher_rl at tp=2 with TE (use_te auto): sequence parallel, so the 4h outside the TP regions split by 2."""
    plan = _plan(setup)
    teacher_rl = plan.stages[0]
    est = estimate_stage_memory(plan, teacher_rl, setup[2])
    assert est.weights_gib * GIB == pytest.approx(P * 2)  # bf16
    assert est.grads_gib * GIB == pytest.approx(P * 4)  # fp32 grad buffer
    assert est.optim_gib * GIB == pytest.approx(P * 12 / 4)  # master + 2 moments, sharded over dp=4
    assert (est.frozen_gib, est.fp8_gib) == (0, 0)  # no teacher, kl_beta 0, no fp8
    per_token_layer = OUTSIDE_TP / 2 + INSIDE_TP / 2  # 9,472 elements
    act = 4 * per_token_layer * 2 * 1000 + LOGITS  # 4 layers x bf16 x 1000 tokens + logits = 235,776,000 bytes
    assert act == 235_776_000 and est.activations_gib * GIB == pytest.approx(act)
    assert est.train_peak_gib * GIB == pytest.approx(P * (2 + 4 + 3) + act + OVERHEAD)

    # without TE there is no sequence parallelism: every TP rank holds the 4h whole
    plan.models["teacher"].use_te = "no"
    no_sp = estimate_stage_memory(plan, teacher_rl, setup[2])
    assert no_sp.activations_gib * GIB == pytest.approx(4 * (OUTSIDE_TP + INSIDE_TP / 2) * 2 * 1000 + LOGITS)
    # full recompute keeps each layer's input (h, whole without SP) + one layer's activations during its backward
    plan.models["teacher"].recompute = True
    rec = estimate_stage_memory(plan, teacher_rl, setup[2])
    assert rec.activations_gib * GIB == pytest.approx(
        4 * 1024 * 2 * 1000 + (OUTSIDE_TP + INSIDE_TP / 2) * 2 * 1000 + LOGITS)


def test_generation_phase_vllm_derived_by_hand(setup):
    """Rollouts on vLLM with the grads and the optimizer on the host: resident = weights + CUDA context/NCCL; the
    share is derived as budget - resident - headroom, and must hold vLLM's weights, working memory and one
    sequence's KV cache."""
    plan = _plan(setup, ["stages.teacher_rl.rollout.engine=vllm", "stages.teacher_rl.eval=false",
                         "stages.teacher_rl.rollout.vllm.enforce_eager=true"])
    est = estimate_stage_memory(plan, plan.stages[0], setup[2])
    resident = P * 2 + OVERHEAD
    assert est.resident_gib * GIB == pytest.approx(resident)
    v = est.vllm
    assert v.derived and v.util == pytest.approx((80 * GIB - resident - HEADROOM_GIB * GIB) / (80 * GIB))
    assert est.engine_gib == pytest.approx(v.util * 80)
    assert est.gen_peak_gib == pytest.approx(80 - HEADROOM_GIB)
    assert v.weights_gib * GIB == pytest.approx(TOTAL / 2 * 2)  # every layer at vLLM tp = 2, bf16
    # a 16384-token forward (one layer, no sequence parallelism) + the sampler on 1024 rows x vocab x 32 bytes
    assert v.working_gib * GIB == pytest.approx((OUTSIDE_TP + INSIDE_TP / 2) * 2 * 16384 + 1024 * 32000 * 32)
    assert v.seq_kv_gib * GIB == pytest.approx(2 * 4 * 1 * 128 * 2 * MAX_MODEL_LEN)  # k+v, 4 layers, 1 kv head
    plan.stages[0].rollout.vllm.enforce_eager = False  # CUDA graphs: their memory comes out of the share's KV cache
    graphs = estimate_stage_memory(plan, plan.stages[0], setup[2]).vllm
    assert graphs.working_gib == pytest.approx(v.working_gib + VLLM_CUDA_GRAPH_GIB) and graphs.util == v.util
    plan.stages[0].rollout.vllm.enforce_eager = True
    assert est.fits and vllm_memory_fraction(plan, plan.stages[0], setup[2]) == v.util
    # at run time the fraction is of the GPU's real total: an H200 still leaves vLLM only what the budget allows
    h200 = vllm_memory_fraction(plan, plan.stages[0], setup[2], total_gib=139.8)
    assert h200 * 139.8 * GIB == pytest.approx(80 * GIB - resident - HEADROOM_GIB * GIB)


def test_generation_phase_megatron_sampler_by_hand(setup):
    """rollout.max_batch_tokens = 65536: the sampler's static KV cache (65536 slots) + a 16384-token prefill forward +
    the decode logits of 65536 // 1124 = 58 rows, in the trainer's pool, grads and optimizer on the host; the final
    evaluation the same way (same lengths here)."""
    plan = _plan(setup, ["stages.teacher_rl.rollout.max_batch_tokens=65536"])
    est = estimate_stage_memory(plan, plan.stages[0], setup[2])
    kv = 2 * 4 * 1 * 128 * 2 * 65536  # k+v x 4 layers x 1 kv head x 128 x bf16 x slots = 134,217,728
    prefill = (OUTSIDE_TP + INSIDE_TP / 2) * 2 * 16384  # 377,487,360
    logits = 58 * 32000 * 10  # 18,560,000
    assert est.vllm is None and est.sampler.slots == 65536 and not est.sampler.auto
    assert est.sampler.kv_gib * GIB == kv and est.sampler.working_gib * GIB == pytest.approx(prefill + logits)
    assert est.eval_sampler == est.sampler
    assert est.gen_peak_gib * GIB == pytest.approx(P * 2 + OVERHEAD + kv + prefill + logits)
    assert est.fits


def test_megatron_sampler_auto_takes_its_share_of_the_free_memory(setup):
    """max_batch_tokens "auto" (the default): the KV cache gets 85 % of what is free once the grads and optimizer
    are on the host (80 GiB - weights - CUDA context/NCCL); one sequence must fit in it."""
    plan = _plan(setup)
    est = estimate_stage_memory(plan, plan.stages[0], setup[2])
    free = 80 * GIB - P * 2 - OVERHEAD
    slots = int(0.85 * free // 2048)  # 2,048 KV bytes per token
    rows = slots // MAX_MODEL_LEN
    assert est.sampler.auto and est.sampler.slots == slots
    assert est.gen_peak_gib * GIB == pytest.approx(P * 2 + OVERHEAD + slots * 2048
                                                   + (OUTSIDE_TP + INSIDE_TP / 2) * 2 * 16384 + rows * 32000 * 10)
    assert est.fits
    # a sequence longer than what is free: 85 % of (5 - 3.12) GiB / 2048 B = 0.84M slots < one 2M-token row
    plan = _plan(setup, ["launch.gpu_memory_gib=5", "data.max_prompt_tokens=2000000"])
    est = estimate_stage_memory(plan, plan.stages[0], setup[2])
    assert est.gen_problems[0].startswith("stages.teacher_rl: rollouts on the megatron sampler need the KV cache of "
                                          "one sequence (3.81 GiB), but stages.teacher_rl.rollout.max_batch_tokens = "
                                          "auto finds room for only 1.60 GiB")


def test_sampler_constants_agree_with_the_sampler():
    """models/ sits below rollout/: the sampler's "auto" fraction and prefill chunk are repeated, and must agree."""
    import inspect

    from megatron_s2d.models import memory
    from megatron_s2d.rollout import megatron_sampler

    assert memory.SAMPLER_KV_FRACTION == megatron_sampler.KV_MEMORY_FRACTION
    defaults = inspect.signature(megatron_sampler.MegatronSampler).parameters
    assert memory.SAMPLER_PREFILL_TOKENS == defaults["prefill_chunk_tokens"].default


def test_teacher_reference_and_fp8_terms(setup):
    plan = _plan(setup)
    teacher_rl, opd = plan.stages
    d = estimate_stage_memory(plan, opd, setup[2])  # the frozen teacher at tp=2, bf16, resident in both phases
    assert d.frozen_gib * GIB == pytest.approx(P * 2) and d.fp8_gib == 0
    plan.models["teacher"].fp8 = "tensorwise"  # TE's FP8 weight copy + transpose: 2 bytes per parameter
    d = estimate_stage_memory(plan, opd, setup[2])
    assert d.fp8_gib * GIB == pytest.approx(P * 2)
    assert d.resident_gib * GIB == pytest.approx(P * 2 + P * 2 + P * 2 + OVERHEAD)
    base = estimate_stage_memory(plan, teacher_rl, setup[2])  # the trained teacher now in FP8 too
    assert base.fp8_gib * GIB == pytest.approx(P * 2)
    teacher_rl.grpo.kl_beta = 0.01  # a frozen reference policy appears (built like the policy: FP8 cache as well)
    ref = estimate_stage_memory(plan, teacher_rl, setup[2])
    assert ref.frozen_gib * GIB == pytest.approx(P * 2) and ref.fp8_gib * GIB == pytest.approx(2 * P * 2)
    teacher_rl.optim.use_distributed_optimizer = False
    assert estimate_stage_memory(plan, teacher_rl, setup[2]).optim_gib * GIB == pytest.approx(P * 12)


def test_set_utilization_that_cannot_fit_is_refused_naming_the_field(setup):
    # 0.95 x 40 = 38 GiB + 3.12 resident (weights 0.12 + CUDA context/NCCL 3) > 40; at most (40 - 3.12) / 40 = 0.92
    plan = _plan(setup, ["launch.gpu_memory_gib=40", "stages.teacher_rl.rollout.engine=vllm",
                         "stages.teacher_rl.rollout.vllm.gpu_memory_utilization=0.95"])
    est = estimate_stage_memory(plan, plan.stages[0], setup[2])
    assert not est.vllm.derived and est.engine_gib == pytest.approx(38)
    assert est.gen_peak_gib * GIB == pytest.approx(38 * GIB + P * 2 + OVERHEAD)
    assert len(est.problems) == 1
    assert est.problems[0].startswith("stages.teacher_rl.rollout.vllm.gpu_memory_utilization = 0.95: vLLM takes "
                                      "0.95 x 40 = 38.0 GiB per GPU while awake, on top of the 3.1 GiB")
    assert "41.1 GiB > launch.gpu_memory_gib = 40; at most 0.92 fits" in est.problems[0]
    with pytest.raises(S2DError, match=r"stages\.teacher_rl\.rollout\.vllm\.gpu_memory_utilization = 0\.95"):
        vllm_memory_fraction(plan, plan.stages[0], setup[2])
    plan.stages[0].rollout.vllm.gpu_memory_utilization = 0.9  # 36 + 3.12 fits: kept as set
    assert vllm_memory_fraction(plan, plan.stages[0], setup[2]) == 0.9


def test_share_too_small_for_one_sequence_is_refused(setup):
    # budget 8: share = 8 - 3.12 - 4 = 0.88 GiB (0.11 of 8) < vLLM's weights 0.12 + working 0.35 + 0.98 + CUDA graphs
    # 1 (rollout.vllm.enforce_eager is false by default)
    plan = _plan(setup, ["launch.gpu_memory_gib=8", "stages.teacher_rl.rollout.engine=vllm"])
    with pytest.raises(S2DError, match=r"stages\.teacher_rl\.rollout\.vllm\.gpu_memory_utilization derived as "
                                       r"0\.11 .* cannot hold vLLM's weights 0\.1 \+ working memory 2\.3 \+ the KV "
                                       r"cache of one 1124-token sequence"):
        vllm_memory_fraction(plan, plan.stages[0], setup[2])


def test_training_over_budget_names_the_stage(setup):
    plan = _plan(setup, ["launch.gpu_memory_gib=3.5", "stages.teacher_rl.rollout.max_batch_tokens=65536"])
    est = estimate_stage_memory(plan, plan.stages[0], setup[2])
    (train,), (rollouts, final_eval) = est.train_problems, est.gen_problems
    assert train.startswith("stages.teacher_rl: the training phase needs weights 0.1 + teacher/ref 0.0 + fp8 caches "
                            "0.0 + CUDA context/NCCL 3.0 + grads 0.2 + optimizer 0.2 + activations 0.2 = 3.7 GiB per "
                            "GPU > launch.gpu_memory_gib = 3.5; lower stages.teacher_rl.micro_batch_tokens")
    assert rollouts.startswith("stages.teacher_rl: rollouts on the megatron sampler need weights 0.1 ")
    assert ("the sampler's KV cache 0.1 (stages.teacher_rl.rollout.max_batch_tokens = 65536) + working memory 0.4 = "
            "3.6 GiB per GPU > launch.gpu_memory_gib = 3.5") in rollouts
    assert final_eval.startswith("stages.teacher_rl: the final evaluation needs ") and "= 3.6 GiB" in final_eval


def test_base_eval_has_no_training_phase(setup):
    plan = _plan(setup, ["launch.gpu_memory_gib=20"])
    est = estimate_base_eval_memory(plan, setup[2])
    assert not est.trains and est.train_peak_gib == 0 and est.fits
    slots = int(0.85 * (20 * GIB - P * 2 - OVERHEAD) // 2048)  # the evaluation's sampler: max_batch_tokens auto
    assert est.sampler.slots == slots
    assert est.gen_peak_gib * GIB == pytest.approx(P * 2 + OVERHEAD + slots * 2048
                                                   + (OUTSIDE_TP + INSIDE_TP / 2) * 2 * 16384
                                                   + slots // MAX_MODEL_LEN * 32000 * 10)
