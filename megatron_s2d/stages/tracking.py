"""Experiment tracking of a stage: the metrics of every step (what ``metrics.jsonl`` holds) to TensorBoard and,
opt-in, to Weights & Biases. Rank 0 writes; ``stages.store.MetricsLog`` calls it after each metrics line.

    tracking = StageTracking.of(plan, stage, layout, enabled=rank == 0)   # every rank: checks the packages asked for
    tracking.log(step, {"reward_mean": 0.4, ...})    # the first call opens the sinks (at the first step written)
    tracking.close()                                 # also at process exit

Layout (``plan.tracking``):

    <run_dir>/stages/<stage>/tensorboard/   TensorBoard event files: one TensorBoard *run* per stage, so
                                            ``tensorboard --logdir <run_dir>/stages`` overlays the stages; a tag is
                                            the metric's name in metrics.jsonl (``reward_mean``, ``kl_mean``,
                                            ``step_time_s``, ...), its step the stage step (1-based, as in the file)
    <run_dir>/stages/<stage>/wandb_run_id   the stage's W&B run id (kept across attempts of the stage)
    <run_dir>/wandb/                        W&B's own files (offline: ``offline-run-*/run-<id>.wandb``, uploaded
                                            later with ``wandb sync <run_dir>/wandb/offline-run-*``)

W&B (``tracking.wandb: true``): one run per stage, ``group`` = the plan name + a hash of the run folder (the stages of
one plan run sit together), ``name`` = the stage, ``job_type`` = its kind, ``config`` = the stage's config.

Resume: a resumed stage recomputes the steps after its checkpoint (identically). The first step a job writes is where
its metrics start over: the TensorBoard writer opens with ``purge_step`` at that step, so TensorBoard drops an earlier
attempt's points from that step on (both its Python reader and its data server), and no step shows twice. W&B keeps
one run per stage (same id, ``resume="allow"``): online, steps W&B already holds are not sent again; offline, each
attempt is an offline-run folder of the same run id (``wandb sync`` uploads them in order; W&B keeps steps
increasing, so the recomputed steps, equal to the first attempt's, are not duplicated).

A tracker that fails while the stage runs (a full disk, W&B unreachable) is switched off with a message on stderr:
the stage goes on (rank 0 raising would leave the other ranks waiting in a collective).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import secrets
import string
import sys
from pathlib import Path

from megatron_s2d.config import PlanConfig, StageBase, to_dict
from megatron_s2d.config.schema import TrackingConfig
from megatron_s2d.errors import S2DError
from megatron_s2d.stages.layout import RunLayout


def tensorboard_dir(stage_dir: Path) -> Path:
    return stage_dir / "tensorboard"


def wandb_group(plan_name: str, run_root: Path) -> str:
    """The W&B group of a plan run: the plan's name + a hash of its run folder (two runs of one plan stay apart)."""
    return f"{plan_name}-{hashlib.sha256(str(run_root).encode()).hexdigest()[:8]}"


def require(package: str, what: str, install: str) -> None:
    """An actionable error when ``package`` (a plan setting needs it) is not installed where the job runs."""
    if importlib.util.find_spec(package) is None:
        raise S2DError(f"{what} needs the {package!r} package, which is not installed in this environment "
                       f"({sys.executable}): {install}")


class TensorBoardSink:
    """One TensorBoard run: scalars ``<metric>`` at the stage step, flushed every step (a killed job loses none)."""

    def __init__(self, logdir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        # purge_step: a reader drops what an earlier attempt wrote at steps >= first_step (recomputed now)
        self.writer = SummaryWriter(str(logdir), purge_step=first_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per stage (resumed by id across attempts), logged at the stage step."""

    def __init__(self, cfg: TrackingConfig, run_root: Path, id_file: Path, group: str, name: str, job_type: str,
                 config: dict):
        import wandb

        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=group, name=name,
                              job_type=job_type, id=run_id, resume="allow", dir=str(run_root), mode=cfg.wandb_mode,
                              config=config)
        self.skip_below = int(self.run.step or 0)  # online resume: the steps W&B already holds
        where = f"offline files in {Path(self.run.dir).parent}" if cfg.wandb_mode == "offline" else self.run.url
        print(f"[{name}] W&B run {name} ({run_id}) in group {group}: {where}", flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.skip_below:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class StageTracking:
    """The trackers of one stage, opened at the first step written (that step is where a resume starts over)."""

    def __init__(self, cfg: TrackingConfig, stage_dir: Path, run_root: Path, stage_name: str, stage_kind: str,
                 group: str, config: dict, enabled: bool):
        self.cfg, self.stage_dir, self.run_root, self.enabled = cfg, stage_dir, run_root, enabled
        self.stage_name, self.stage_kind, self.group, self.config = stage_name, stage_kind, group, config
        self.sinks: list | None = None
        if cfg.tensorboard:
            require("tensorboard", "tracking.tensorboard", "pip install tensorboard (or set tracking.tensorboard=false)")
        if cfg.wandb:
            require("wandb", "tracking.wandb", "pip install wandb (or pip install 'megatron-s2d[tracking]'), or set "
                                               "tracking.wandb=false")

    @staticmethod
    def of(plan: PlanConfig, stage: StageBase, layout: RunLayout, enabled: bool) -> "StageTracking":
        config = {"stage": to_dict(stage), "plan": {"name": plan.name, "run_dir": str(layout.root), "seed": plan.seed,
                                                    "models": {k: to_dict(v) for k, v in plan.models.items()}}}
        return StageTracking(plan.tracking, layout.stage(stage.name), layout.root, stage.name, stage.kind,
                             wandb_group(plan.name, layout.root), config, enabled)

    def _open(self, first_step: int) -> list:
        sinks = []
        if self.cfg.tensorboard:
            sinks.append(TensorBoardSink(tensorboard_dir(self.stage_dir), first_step))
        if self.cfg.wandb:
            sinks.append(WandbSink(self.cfg, self.run_root, self.stage_dir / "wandb_run_id", self.group,
                                   self.stage_name, self.stage_kind, self.config))
        atexit.register(self.close)
        return sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """``metrics`` at stage step ``step`` (1-based, as in metrics.jsonl) to every tracker (rank 0)."""
        if not self.enabled or not (self.cfg.tensorboard or self.cfg.wandb):
            return
        if self.sinks is None:
            self.sinks = []
            try:
                self.sinks = self._open(step)
            except Exception as e:  # noqa: BLE001 - tracking must not stop (or hang) the stage
                self._off("tracking", e)
                return
        for sink in list(self.sinks):
            try:
                sink.log(step, metrics)
            except Exception as e:  # noqa: BLE001
                self.sinks.remove(sink)
                self._off(type(sink).__name__, e)

    def close(self) -> None:
        sinks, self.sinks = self.sinks or [], []
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                self._off(type(sink).__name__, e)

    def _off(self, what: str, error: Exception) -> None:
        print(f"[{self.stage_name}] warning: {what} switched off for this job: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)


def read_tensorboard(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run as TensorBoard shows it (its own reader, purges applied): tag -> [(step,
    value)]. For tests and scripts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
