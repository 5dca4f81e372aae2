"""Memory estimate vs numbers computed by hand for SMALL_LLAMA (h=1024, L=4, 8 heads / 2 kv heads of 128, ffn 4096,
vocab 32000, untied)."""

import pytest

from megatron_s2d.config import GRPOStageConfig
from megatron_s2d.launch.memory import GIB, OVERHEAD_GIB, estimate_stage_memory, params_on_heaviest_stage
from megatron_s2d.models.arch import load_arch
from tests.unit.launch._plans import load, two_stage_plan, write_hf

# per layer: attention 1024*1024 (q) + 2*1024*256 (k, v) + 1024*1024 (o) + MLP 3*1024*4096 + two norms 2*1024
PER_LAYER = 1024 * 1024 + 2 * 1024 * 256 + 1024 * 1024 + 3 * 1024 * 4096 + 2 * 1024  # 15,206,400
EMB = 32000 * 1024
TOTAL = 4 * PER_LAYER + 2 * EMB + 1024  # untied input + output embedding, final norm
ACT_ELEMS = 4 * 1024 + 2 * 1024 + 2 * 256 + 3 * 4096  # per token per layer (no q/k-norm for llama)


@pytest.fixture()
def setup(tmp_path):
    hf = write_hf(tmp_path / "small")
    return tmp_path, hf, load_arch(hf)


def test_param_count_and_stage_split(setup):
    _, _, arch = setup
    assert arch.num_params == TOTAL == 126_362_624
    assert params_on_heaviest_stage(arch, tp=2, pp=1) == TOTAL / 2
    # pp=2: two layers + one embedding matrix (+ the final norm on the last stage)
    assert params_on_heaviest_stage(arch, tp=1, pp=2) == 2 * PER_LAYER + EMB + 1024


def test_student_rl_terms_by_hand(setup):
    tmp, hf, arch = setup
    plan = load(tmp, two_stage_plan(tmp, hf, hf))
    stage = GRPOStageConfig(name="srl", kind="student_rl", split="2H", micro_batch_tokens=1000, eval=False)
    stage.rollout.max_new_tokens = 100
    stage.rollout.engine = "megatron"
    p = TOTAL / 2  # tp=2
    est = estimate_stage_memory(plan, stage, {"teacher": arch, "student": arch}, dp=4)
    assert est.weights_gib == pytest.approx(p * 2 / GIB)  # bf16
    assert est.grads_gib == pytest.approx(p * 4 / GIB)  # fp32 grad buffer
    assert est.optim_gib == pytest.approx(p * 12 / 4 / GIB)  # master + 2 moments, sharded over DP=4
    act = 4 * ACT_ELEMS * 2 * 1000 / 2 + 1000 * 32000 / 2 * 10  # 4 layers, bf16, tp=2; fp32 logits
    assert est.activations_gib == pytest.approx(act / GIB)
    kv_per_token = 2 * 4 * 1 * 128 * 2  # k+v, 4 layers, 2 kv heads / tp 2, head_dim, bf16
    assert est.rollout_gib == pytest.approx(kv_per_token * 32 * (512 + 100) / GIB)  # megatron engine: KV only
    assert est.teacher_gib == 0
    assert est.total_gib == pytest.approx((p * (2 + 4 + 3) + act) / GIB + OVERHEAD_GIB)


def test_switches_change_the_right_terms(setup):
    tmp, hf, arch = setup
    plan = load(tmp, two_stage_plan(tmp, hf, hf))
    archs = {"teacher": arch, "student": arch}
    teacher_rl, opd = plan.stages
    base = estimate_stage_memory(plan, teacher_rl, archs, dp=4)
    teacher_rl.optim.use_distributed_optimizer = False
    assert estimate_stage_memory(plan, teacher_rl, archs, dp=4).optim_gib == pytest.approx(4 * base.optim_gib)
    teacher_rl.grpo.kl_beta = 0.01  # a frozen reference policy appears
    assert estimate_stage_memory(plan, teacher_rl, archs, dp=4).teacher_gib == pytest.approx(base.weights_gib)
    plan.models["teacher"].recompute = True
    rec = estimate_stage_memory(plan, teacher_rl, archs, dp=4)
    logits = 1000 * 32000 / 2 * 10
    assert rec.activations_gib == pytest.approx((4 * 1024 * 2 * 1000 / 2 + ACT_ELEMS * 2 * 1000 / 2 + logits) / GIB)
    teacher_rl.rollout.engine = "vllm"  # vLLM keeps its own bf16 weight copy
    assert estimate_stage_memory(plan, teacher_rl, archs, dp=4).rollout_gib == pytest.approx(
        rec.rollout_gib + TOTAL / 2 * 2 / GIB)
    d = estimate_stage_memory(plan, opd, archs, dp=4)  # opd scores with the teacher at tp=2, bf16
    assert d.teacher_gib == pytest.approx(TOTAL / 2 * 2 / GIB)


def test_vllm_engine_terms_at_its_own_tp(setup):
    """vLLM (and auto, which the job resolves to vLLM where installed) holds a bf16 copy of every layer split
    rollout.vllm.tp ways plus a KV cache for all layers; the megatron sampler only its KV cache at the model's tp/pp."""
    tmp, hf, arch = setup
    plan = load(tmp, two_stage_plan(tmp, hf, hf))
    stage = GRPOStageConfig(name="srl", kind="student_rl", split="2H", micro_batch_tokens=1000, eval=False)
    stage.rollout.max_new_tokens = 100
    archs = {"teacher": arch, "student": arch}
    tokens = 32 * (512 + 100)
    for engine, vtp in (("vllm", 4), ("auto", 0)):
        stage.rollout.engine, stage.rollout.vllm.tp = engine, vtp or None
        tp = vtp or 2  # default: the model's training tp
        kv = 2 * 4 * (2 // tp if 2 >= tp else 1) * 128 * 2 * tokens
        est = estimate_stage_memory(plan, stage, archs, dp=4)
        assert est.rollout_gib == pytest.approx((TOTAL / tp * 2 + kv) / GIB), engine
