"""The run store of one stage: where its parents' checkpoints are, and everything it writes into the run folder.

    store = RunStore(layout, plan, stage, is_main=rank == 0)
    parent = store.checkpoint_of("fkl_warmup", "student")      # a completed stage's final checkpoint, or the base
    store.metrics.append(step, {"reward_mean": 0.4, ...});  store.save(policy, state, assets)
    store.finish(final_checkpoint, state, eval_results)         # eval.json, lineage.json, then COMPLETE (last)

The file contract between jobs is ``stages.layout``; this is the only writer of a stage's folder. Rank 0 writes
(``is_main``); checkpoints are collective (every rank writes its shards).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from megatron_s2d.config import PlanConfig, StageBase
from megatron_s2d.config.validate import ancestors, label_ledger, split_parts
from megatron_s2d.data.split_store import read_manifests
from megatron_s2d.errors import S2DError, read_json, read_jsonl
from megatron_s2d.stages.counters import Ledger, StageState
from megatron_s2d.stages.layout import RunLayout
from megatron_s2d.stages.provenance import config_record
from megatron_s2d.stages.tracking import StageTracking


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MetricsLog:
    """``metrics.jsonl``: one line per step (rank 0), and the same metrics to the stage's trackers (TensorBoard, W&B:
    ``stages.tracking``). On resume the lines of steps after the checkpoint are dropped: they will be recomputed,
    identically (the trackers start over at the first step written again)."""

    def __init__(self, path: Path, enabled: bool, tracking: StageTracking | None = None):
        self.path, self.enabled, self.tracking = path, enabled, tracking

    def append(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        line = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
            if self.tracking is not None:
                self.tracking.log(line["step"], {k: v for k, v in line.items() if k != "step"})
        return line

    def truncate(self, step: int) -> None:
        if self.enabled and self.path.is_file():
            kept = [m for m in read_jsonl(self.path) if m["step"] <= step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))

    def close(self) -> None:
        """Flush and close the trackers (also done at process exit)."""
        if self.tracking is not None:
            self.tracking.close()


class RunStore:
    def __init__(self, layout: RunLayout, plan: PlanConfig, stage: StageBase, is_main: bool):
        self.layout, self.plan, self.stage, self.is_main = layout, plan, stage, is_main
        self.dir = layout.stage(stage.name)
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", is_main,
                                  StageTracking.of(plan, stage, layout, enabled=is_main))

    # ------------------------------------------------------------------------------------------ reading
    def checkpoint_of(self, ref: str | None, role: str) -> Path:
        """The checkpoint a reference resolves to: 'base' -> the imported base model; a stage -> its final one."""
        if ref in (None, "base"):
            path = self.layout.base_model(role)
        else:
            lineage = self.layout.stage(ref) / "lineage.json"
            if not (lineage.is_file() and self.layout.is_complete(ref)):  # a lineage without COMPLETE is stale
                missing = lineage if not lineage.is_file() else self.layout.complete_marker(ref)
                raise S2DError(f"stage {self.stage.name!r} needs stage {ref!r}, which has not completed "
                               f"({missing} is missing): run it first")
            path = Path(read_json(lineage)["final_checkpoint"])
        if not (path / "s2d_model.json").is_file():
            raise S2DError(f"{path}: not a megatron-s2d model checkpoint (run `s2d run` to prepare base models)")
        return path

    @property
    def checkpoints(self) -> Path:
        return self.layout.checkpoints(self.stage.name)

    # ------------------------------------------------------------------------------------------ writing
    def save(self, policy, state: StageState, assets, layout: dict[str, int],
             extra: dict[str, str] | None = None) -> Path:
        """A training checkpoint of ``policy`` at ``state.step`` (collective), with the model metadata, tokenizer and
        HF extras of ``assets`` so the next stage and ``s2d convert megatron-to-hf`` read it as a model checkpoint.
        ``extra``: {file name: text} written into it too (the rollouts in flight: ``rollout.remote``)."""
        from megatron_s2d.checkpoint.model_ckpt import write_model_meta
        from megatron_s2d.checkpoint.train_ckpt import save_train_checkpoint

        role = self.stage.trains

        def write_meta(tmp: Path) -> None:
            write_model_meta(tmp, assets.arch, self.plan.models[role].dtype, layout,
                             source={"stage": self.stage.name, "step": state.step})
            for sub in ("tokenizer", "hf_extra"):
                if (assets.path / sub).is_dir():
                    shutil.copytree(assets.path / sub, tmp / sub)
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)

        return save_train_checkpoint(policy, self.checkpoints, state.step,
                                     {"ledger": asdict(state.ledger), "stage": self.stage.name,
                                      "config": config_record(self.plan, self.stage)}, write_meta,
                                     keep=self.stage.keep_checkpoints)

    def lineage(self, final: Path, state: StageState, init_dir: Path) -> dict:
        s, plan = self.stage, self.plan
        teacher = s.teachers()[0] if s.teachers() else None
        record = config_record(plan, s)
        by_name = {x.name: x for x in plan.stages}
        return {
            "stage": s.name, "kind": s.kind, "control": s.control, "policy_model": s.trains,
            "parents": {"init": s.init, "init_checkpoint": str(init_dir), "teacher": teacher,
                        "teacher_checkpoint": str(self.checkpoint_of(teacher, "teacher")) if teacher else None},
            "ancestors": ancestors(plan, s.name),
            "split": s.split,
            "split_manifests": {part: read_manifests(self.layout.data)[part] for part in split_parts(s.split)},
            "labels_used_by_lineage": label_ledger(plan)[s.name],
            "config_hash": record["digest"],  # of the result-changing settings (config.fingerprint)
            "config_fields": record["fields"],
            "plan_models_hash": config_hash({k: asdict(v) for k, v in plan.models.items()}),
            "final_checkpoint": str(final), "steps": state.step,
            "ledger": asdict(state.ledger),
            "ancestor_ledgers": {a: read_json(self.layout.stage(a) / "lineage.json")["ledger"]
                                 for a in ancestors(plan, s.name) if a in by_name},
        }

    def finish(self, final: Path, state: StageState, init_dir: Path, eval_results: dict | None) -> None:
        """eval.json, lineage.json, then the COMPLETE marker, written last (rank 0)."""
        if not self.is_main:
            return
        if eval_results is not None:
            (self.dir / "eval.json").write_text(json.dumps(eval_results, indent=1))
        (self.dir / "lineage.json").write_text(json.dumps(self.lineage(final, state, init_dir), indent=1))
        self.layout.complete_marker(self.stage.name).write_text(str(final) + "\n")

    def start_fresh(self) -> None:
        """A stage with no checkpoint starts from its parent: what an earlier attempt left (a lineage or eval of a
        run that never completed, neutral-change notes) is stale and goes; metrics are truncated by the caller."""
        if self.is_main and not self.layout.is_complete(self.stage.name):
            for name in ("lineage.json", "eval.json", "config_changes.jsonl"):
                (self.dir / name).unlink(missing_ok=True)

    @staticmethod
    def restored(saved: dict) -> StageState:
        """The stage state of a loaded training checkpoint's trainer state."""
        return StageState(step=saved["step"], ledger=Ledger(**saved["ledger"]))
