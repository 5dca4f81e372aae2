"""Everything a stage loop needs, set up once: plan, layout, tokenizer, data, models, engine, ledger, checkpoints.

The stage loops (grpo.py, fkl_warmup.py, opd.py) read like the paper because all plumbing lives here: which
checkpoint a policy starts from (its parent stage's final checkpoint, Megatron-natively, or the imported base
model), resuming, the per-step prompt stream, rewards, logging, the ledger, lineage and the COMPLETE marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_s2d.config import PlanConfig, StageConfig, load_plan, to_dict
from megatron_s2d.config.validate import ancestors, label_ledger, policy_model
from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION, build_prompt
from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError
from megatron_s2d.pipeline.layout import RunLayout
from megatron_s2d.pipeline.splits_io import read_split
from megatron_s2d.runtime.dist import DistInfo, init_distributed
from megatron_s2d.runtime.model_ckpt import load_model_checkpoint, read_model_meta, write_model_meta


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Ledger:
    """What a stage consumed and produced (accumulated over its own steps; lineage adds the ancestors')."""

    labels_consumed: int = 0  # distinct labeled problems whose gold answers were used for a reward
    prompts: int = 0  # prompts drawn (with repetition across epochs)
    generated_tokens: int = 0
    teacher_scored_tokens: int = 0
    wall_time_s: float = 0.0


@dataclass
class StageState:
    step: int = 0
    ledger: Ledger = field(default_factory=Ledger)


def stop_token_ids(ckpt_dir: Path, tokenizer) -> tuple[int, ...]:
    """EOS ids for generation: the checkpoint's generation_config, else the tokenizer's EOS."""
    gen_cfg = Path(ckpt_dir) / "hf_extra" / "generation_config.json"
    ids = None
    if gen_cfg.is_file():
        ids = json.loads(gen_cfg.read_text()).get("eos_token_id")
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise S2DError(f"{ckpt_dir}: no eos_token_id in hf_extra/generation_config.json and none in the tokenizer")
    return tuple(ids) if isinstance(ids, list) else (int(ids),)


class StageContext:
    def __init__(self, plan: PlanConfig, stage_name: str):
        by_name = {s.name: s for s in plan.stages}
        if stage_name not in by_name:
            raise S2DError(f"stage {stage_name!r} is not in the plan; stages: {sorted(by_name)}")
        self.plan = plan
        self.stage: StageConfig = by_name[stage_name]
        self.layout = RunLayout.of(plan.run_dir)
        self.role = policy_model(self.stage)
        mcfg = plan.models[self.role]
        self.dist: DistInfo = init_distributed(mcfg.tp, mcfg.pp, seed=plan.seed)
        self.dir = self.layout.stage(stage_name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.init_dir = self.checkpoint_of(self.stage.init, self.role)
        self.arch, _ = read_model_meta(self.init_dir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.init_dir / "tokenizer"))
        self.stop_ids = stop_token_ids(self.init_dir, self.tokenizer)
        self.problems: list[Problem] = read_split(self.layout, self.stage.split)
        instruction = plan.data.instruction or DEFAULT_INSTRUCTION
        self.prompt_ids = [self.encode_prompt(p, instruction) for p in self.problems]
        self.started = time.perf_counter()
        # processes the stage spawns (vLLM engine cores) are started inside this, so that the SIGUSR1 meant for
        # the stage (SLURM time limit) does not kill them; set by the entry point to the preemption handler's
        self.shield_children = contextlib.nullcontext

    @staticmethod
    def from_args(plan_path: str, stage_name: str) -> "StageContext":
        return StageContext(load_plan(plan_path), stage_name)

    # --------------------------------------------------------------------------------------- models
    def checkpoint_of(self, ref: str | None, role: str) -> Path:
        """The checkpoint a reference resolves to: 'base' -> the imported base model; a stage -> its final one."""
        if ref in (None, "base"):
            path = self.layout.base_model(role)
        else:
            lineage = self.layout.stage(ref) / "lineage.json"
            if not lineage.is_file():
                raise S2DError(f"stage {self.stage.name!r} needs stage {ref!r}, which has not completed "
                               f"({lineage} is missing): run it first")
            path = Path(json.loads(lineage.read_text())["final_checkpoint"])
        if not (path / "s2d_model.json").is_file():
            raise S2DError(f"{path}: not a megatron-s2d model checkpoint (run `s2d run` to prepare base models)")
        return path

    def encode_prompt(self, problem: Problem, instruction: str) -> list[int]:
        text = build_prompt(self.tokenizer, problem, instruction)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build_policy(self):
        """The trainable policy, with weights from the parent stage (or base); resumed if a checkpoint exists."""
        from megatron_s2d.policy.megatron_policy import MegatronPolicy
        from megatron_s2d.runtime.train_ckpt import latest_checkpoint, load_train_checkpoint

        policy = MegatronPolicy(self.arch, self.plan.models[self.role], self.stage.optim,
                                total_updates=self.stage.steps * self.stage.updates_per_step, seed=self.plan.seed)
        state = StageState()
        resume = latest_checkpoint(self.layout.checkpoints(self.stage.name))
        if resume is not None:
            saved = load_train_checkpoint(policy, resume)
            state = StageState(step=saved["step"], ledger=Ledger(**saved["ledger"]))
            self.log(f"resumed from {resume} at step {state.step}")
        else:
            load_model_checkpoint(policy.module, self.init_dir)
        return policy, state

    def build_scorer(self, ref: str | None, role: str = "teacher"):
        """A frozen model (teacher or reference) for scoring, from a stage's final checkpoint or the base, at the
        role's own TP/PP layout (``models.<role>.tp/pp``); see ``policy.scorer`` for how rows are routed."""
        from megatron_s2d.policy.megatron_policy import MegatronPolicy
        from megatron_s2d.policy.scorer import FrozenScorer
        from megatron_s2d.runtime.groups import model_groups

        path = self.checkpoint_of(ref, role)
        arch, _ = read_model_meta(path)
        self.check_tokenizer(path)
        mcfg = self.plan.models[role]
        groups = model_groups(mcfg.tp, mcfg.pp)
        model = MegatronPolicy(arch, mcfg, optim=None, seed=self.plan.seed, groups=groups, initialize=False)
        load_model_checkpoint(model.module, path)
        if not groups.is_global:
            self.log(f"{role} scorer at its own layout tp={mcfg.tp} pp={mcfg.pp} ({groups.dp} replicas) next to "
                     f"the {self.role} at tp={self.dist.tp} pp={self.dist.pp} (dp={self.dist.dp})")
        return FrozenScorer(model, self._dp_rank()), path

    def check_tokenizer(self, other_ckpt: Path) -> None:
        """Teacher and student must share a tokenizer (per-token log-probs are compared id by id)."""
        from megatron_s2d.pipeline.preflight import check_same_tokenizer

        check_same_tokenizer(self.init_dir / "tokenizer", Path(other_ckpt) / "tokenizer")

    def make_engine(self, policy, ckpt_dir: Path | None = None):
        """The rollout engine for ``policy`` (the stage's policy, or a frozen teacher from ``build_scorer`` whose
        checkpoint is ``ckpt_dir``): the megatron sampler, or vLLM when configured. A model in a layout of its own
        generates for every stage DP rank through ``rollout.routed.RoutedEngine``."""
        from megatron_s2d.rollout.megatron_sampler import MegatronSampler

        groups = getattr(policy, "groups", None)
        if self.stage.rollout.engine == "vllm":
            from megatron_s2d.rollout.factory import make_vllm_engine

            with self.shield_children():
                engine = make_vllm_engine(self, policy, ckpt_dir or self.init_dir)
        else:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            engine = MegatronSampler(policy.module, policy.arch, eos_token_ids=list(self.stop_ids), pad_token_id=pad)
        if groups is not None:
            from megatron_s2d.rollout.routed import RoutedEngine

            engine = RoutedEngine(engine, groups, self._dp_rank())
        return engine

    # --------------------------------------------------------------------------------------- data
    def step_problems(self, step: int, count: int) -> list[int]:
        """Indices of the problems for ``step`` (global, before DP sharding): a seeded permutation per epoch,
        consumed in order. Stateless in ``step``, so a resumed stage draws exactly the same prompts."""
        n = len(self.problems)
        if n == 0:
            raise S2DError(f"split {self.stage.split!r} is empty")
        perms: dict[int, torch.Tensor] = {}  # one permutation per epoch touched by this step
        out = []
        for i in range(step * count, (step + 1) * count):
            epoch, pos = divmod(i, n)
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.plan.seed * 1000003 + epoch)
                perms[epoch] = torch.randperm(n, generator=g)
            out.append(int(perms[epoch][pos]))
        return out

    def dp_share(self, items: list) -> list:
        """This data-parallel rank's share (contiguous blocks, so a prompt's group stays on one rank)."""
        dp, rank = self.dist.dp, self._dp_rank()
        if len(items) % dp:
            raise S2DError(f"stages.{self.stage.name}: {len(items)} prompts per step do not divide over "
                           f"{dp} data-parallel ranks")
        per = len(items) // dp
        return items[rank * per:(rank + 1) * per]

    def _dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    def sampling_seed(self, step: int, salt: int = 0) -> int:
        key = f"{self.plan.seed}:{self.stage.name}:{step}:{self._dp_rank()}:{salt}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        from megatron.core import parallel_state as ps

        from megatron_s2d.runtime.dist import comm_device

        t = torch.tensor(values, dtype=torch.float64, device=comm_device())
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        return t.tolist()

    # --------------------------------------------------------------------------------------- logging
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[{self.stage.name}] {msg}", flush=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        metrics = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        keys = [k for k in ("reward_mean", "kl_mean", "reverse_kl_mean", "loss", "clip_frac", "entropy_mean",
                            "response_len_mean", "truncation_rate", "zero_variance_frac", "logprob_mismatch_mean",
                            "nll_mean") if k in metrics]
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
        print(f"[{self.stage.name}] step {step + 1}/{self.stage.steps} {shown}", flush=True)

    def truncate_metrics_log(self, step: int) -> None:
        """On resume, drop metric lines of steps after the checkpoint (they will be recomputed identically)."""
        path = self.dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
            path.write_text("".join(l + "\n" for l in lines))

    # --------------------------------------------------------------------------------------- checkpoints
    def save(self, policy, state: StageState) -> Path:
        from megatron_s2d.runtime.train_ckpt import save_train_checkpoint

        ledger = asdict(state.ledger)

        def write_meta(tmp: Path) -> None:
            import shutil

            write_model_meta(tmp, self.arch, self.plan.models[self.role].dtype,
                             {"tp": self.dist.tp, "pp": self.dist.pp},
                             source={"stage": self.stage.name, "step": state.step})
            for sub in ("tokenizer", "hf_extra"):
                if (self.init_dir / sub).is_dir():
                    shutil.copytree(self.init_dir / sub, tmp / sub)

        return save_train_checkpoint(policy, self.layout.checkpoints(self.stage.name), state.step,
                                     {"ledger": ledger, "stage": self.stage.name}, write_meta)

    def lineage(self, final: Path, state: StageState) -> dict:
        from megatron_s2d.pipeline.splits_io import read_manifests

        manifests = read_manifests(self.layout)
        by_name = {s.name: s for s in self.plan.stages}
        return {
            "stage": self.stage.name, "kind": self.stage.kind, "control": self.stage.control,
            "policy_model": self.role,
            "parents": {"init": self.stage.init, "init_checkpoint": str(self.init_dir),
                        "teacher": self.stage.teacher,
                        "teacher_checkpoint": str(self.checkpoint_of(self.stage.teacher, "teacher"))
                        if self.stage.teacher else None},
            "ancestors": ancestors(self.plan, self.stage.name),
            "split": self.stage.split, "split_manifest": manifests[self.stage.split],
            "labels_used_by_lineage": label_ledger(self.plan)[self.stage.name],
            "config_hash": config_hash(to_dict(self.stage)),
            "plan_models_hash": config_hash({k: asdict(v) for k, v in self.plan.models.items()}),
            "final_checkpoint": str(final), "steps": state.step,
            "ledger": asdict(state.ledger),
            "ancestor_ledgers": {a: json.loads((self.layout.stage(a) / "lineage.json").read_text())["ledger"]
                                 for a in ancestors(self.plan, self.stage.name) if a in by_name},
        }

    def finish(self, policy, state: StageState) -> None:
        """Final checkpoint, evaluation, lineage, then the COMPLETE marker (written last)."""
        from megatron_s2d.eval.runner import evaluate_policy
        from megatron_s2d.runtime.train_ckpt import latest_checkpoint

        state.ledger.wall_time_s += time.perf_counter() - self.started
        self.started = time.perf_counter()
        final = latest_checkpoint(self.layout.checkpoints(self.stage.name))
        if final is None or json.loads((final / "trainer_state.json").read_text())["step"] != state.step:
            final = self.save(policy, state)
        if self.stage.eval:
            results = evaluate_policy(self, policy.module, policy.arch, label=self.stage.name)
            if self.dist.is_main:
                (self.dir / "eval.json").write_text(json.dumps(results, indent=1))
        if self.dist.is_main:
            (self.dir / "lineage.json").write_text(json.dumps(self.lineage(final, state), indent=1))
            self.layout.complete_marker(self.stage.name).write_text(str(final) + "\n")
        torch.distributed.barrier()
        self.log(f"complete: {final}")
