"""The one typed config tree. Every default lives here, nowhere else (no `.get(key, default)` downstream).

Batch-size names state their unit and scope:
  * ``prompts_per_step``      prompts drawn per training step (global, all data-parallel ranks together)
  * ``samples_per_prompt``    rollouts per prompt (the GRPO group size G)
  * ``micro_batch_tokens``    token budget of one micro-batch on one rank (prompt + response tokens, padded)
  * ``updates_per_step``      optimizer updates per rollout batch (the batch is cut into that many mini-batches)
Divisibility and ranges are checked by :func:`megatron_s2d.config.validate.validate_plan` when a plan is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """One model of the plan (teacher or student): where its base weights come from and how it is laid out."""

    hf: str | None = None  # HF folder of the base weights (imported Megatron-natively once, then cached)
    megatron: str | None = None  # or: an existing megatron-s2d model checkpoint folder
    tp: int = 1  # tensor-parallel size used when this model trains or scores
    pp: int = 1  # pipeline-parallel size
    dtype: Literal["fp32", "bf16"] = "fp32"
    use_te: Literal["auto", "yes", "no"] = "auto"  # Transformer Engine layer spec (GPU only)
    fp8: Literal["delayed", "tensorwise", "blockwise"] | None = None  # TE FP8 recipe for training/scoring
    recompute: bool = False  # full activation recomputation
    # sequence packing: a micro-batch is one row of concatenated sequences (no padding), attention kept within each
    # sequence (THD cu_seqlens with Transformer Engine; a block-diagonal mask with the local spec, whose dense
    # attention then costs total^2 instead of sum(len^2)). "auto" = false until the THD path has run on a GPU
    # (tests/gpu/test_packing_gpu.py); not with fp8 (FP8 GEMMs need 16-token padding per sequence).
    pack_sequences: Literal["auto"] | bool = "auto"


@dataclass
class SplitConfig:
    """How the labeled pool is divided. The paper's 1H/2H allocation is ``{"1H": 0.5, "2H": 0.5}``."""

    fractions: dict[str, float] = field(default_factory=lambda: {"1H": 0.5, "2H": 0.5})
    seed: int = 0


@dataclass
class EvalSetConfig:
    name: str = "toy-test"  # label in the report
    source: str = "toy-test"  # dataset name (math500, aime2024, ...) or a path
    limit: int | None = None  # first N problems (None: all)


@dataclass
class DataConfig:
    pool: str = "toy-train"  # labeled pool: dataset name or path (jsonl/parquet)
    pool_limit: int | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    eval: list[EvalSetConfig] = field(default_factory=lambda: [EvalSetConfig()])
    instruction: str | None = None  # None: the default "put the final answer in \boxed{}" instruction


@dataclass
class RolloutConfig:
    # "auto": vLLM when the generating model is at tp = pp = 1, else the megatron sampler (resolved at load time)
    engine: Literal["megatron", "vllm", "auto"] = "megatron"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    max_new_tokens: int = 64
    logprob_topk: int = 0  # also return this many top log-probs per token (0: off)
    vllm_gpu_memory_utilization: float = 0.5
    vllm_cpu_kvcache_gib: int = 1


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of a trained model. The schedule's unit is the optimizer update: a stage
    makes ``steps x updates_per_step`` updates, and that is the schedule's horizon."""

    lr: float = 1e-5  # peak learning rate
    min_lr: float = 0.0  # cosine: the rate reached at the end of the stage (last update + 1)
    warmup_updates: int = 0  # linear warmup, in optimizer updates (not stage steps): steps x updates_per_step in all
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    use_distributed_optimizer: bool = True  # megatron's distributed optimizer where the backend supports it (nccl)


@dataclass
class GRPOConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO)
    kl_beta: float = 0.0  # k3 KL to the reference policy (0: no reference model is loaded)
    kl_clamp: float = 10.0  # the per-token k3 value is clamped to [-kl_clamp, kl_clamp] (verl), after the log-ratio
    scale_by_std: bool = True  # False: Dr. GRPO advantages
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO)
    overlong_filter: bool = False  # mask truncated responses out of the loss


@dataclass
class DistillConfig:
    fkl_mode: Literal["sampled", "topk"] = "topk"  # Stage 2a: sampled-token NLL or top-k forward KL + tail
    topk: int = 16  # teacher top-k log-probs cached with the teacher rollouts
    tail: bool = True  # include the tail bucket in top-k KLs (required for the top-k reverse KL of opd_mode "topk")
    # the cached teacher top-k of fkl_mode "topk" gives the teacher's tail mass only as 1 - sum(top-k probs), which
    # rounds to <= 0 when the teacher is confident; below this floor it counts as the floor (a constant: the student's
    # tail is always computed exactly from its logits, so its gradient is never floored)
    teacher_tail_floor: float = 1e-6
    teacher_samples_per_prompt: int = 4  # teacher rollouts per prompt for the Stage 2a cache
    opd_mode: Literal["sampled", "topk"] = "sampled"  # Stage 2b: sampled reverse KL advantage, or top-k reverse KL
    opd_task_reward_coef: float = 0.0  # add coef * sparse task reward to the dense OPD advantage
    # OPD trains through the same clipped policy-gradient machinery as GRPO:
    eps_low: float = 0.2
    eps_high: float = 0.28


@dataclass
class StageConfig:
    """One node of the plan's DAG."""

    name: str = ""
    kind: Literal["teacher_rl", "fkl_warmup", "opd", "student_rl"] = "student_rl"
    init: str = "base"  # "base" (the model's base weights) or the name of a parent stage to continue from
    teacher: str | None = None  # fkl_warmup / opd: "base" or the name of the teacher stage whose weights score
    split: str | None = None  # data split: labels for RL stages, prompts only for fkl_warmup / opd
    replay: bool = False  # allow labels an ancestor already consumed (the matched-replay control)
    control: str | None = None  # which paper control this stage is (for the report), e.g. "cold_grpo"
    steps: int = 4
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    micro_batch_tokens: int = 4096
    updates_per_step: int = 1
    save_every: int = 0  # checkpoint every N steps (0: only at the end); always at SIGTERM/SIGUSR1
    eval: bool = True  # evaluate the stage's final policy
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class EvalConfig:
    k: int = 16  # samples per problem for avg@k
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    engine: Literal["megatron", "vllm"] = "megatron"
    include_base: bool = True  # also evaluate the base teacher and student


@dataclass
class SlurmConfig:
    account: str = ""
    partition: str = ""
    time: str = "04:00:00"
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    job_dir: str = "~/s2d_jobs"
    tunnel: Literal["local", "ssh"] = "local"
    host: str | None = None
    user: str | None = None
    exclusive: bool = True
    gpus_per_node: int = 8
    mem: str | None = None
    signal_seconds_before_end: int = 300  # SIGUSR1 this long before the time limit: checkpoint and requeue


@dataclass
class LaunchConfig:
    executor: Literal["local", "slurm"] = "local"
    nodes: int = 1
    procs_per_node: int = 1  # torchrun processes per node (GPUs per node on SLURM)
    gpu_memory_gib: float = 80.0  # per-GPU memory for the dry-run estimate
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class PlanConfig:
    """A whole run: models, data, the stage DAG, evaluation and where/how it launches."""

    name: str = "toy"
    run_dir: str = "runs/toy"
    seed: int = 1234
    models: dict[str, ModelConfig] = field(default_factory=dict)  # must hold "teacher" and "student"
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    toy_world: bool = False  # build the embedded toy world (tiny models + tokenizer) under run_dir if missing
    toy_world_seed: int = 0  # its build seed (base accuracies quoted in the README are for seed 0)


# Keys that older plans used, per config class: loading one fails with a message that says what to write instead.
RENAMED: dict[type, dict[str, str]] = {
    OptimConfig: {"warmup_steps": "warmup_updates (it counts optimizer updates: a stage makes steps x "
                                  "updates_per_step of them; warmup_steps was always counted in updates too)"},
}
