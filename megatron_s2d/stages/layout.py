"""Where everything of a run lives on disk (one place, so stages, launcher and report agree).

    <run_dir>/plan.resolved.yaml         the plan after overrides (what every job reads)
    <run_dir>/toy_world/                 a toy world built for this run (toy plans whose seed is not the shipped one)
    <run_dir>/LOCK                       held by the launcher while it runs the plan
    <run_dir>/models/<role>_base/        base weights imported Megatron-natively from HF, once
    <run_dir>/data/                      the splits: splits.json (manifests) and split_<name>.jsonl (members;
                                         ``data.split_store`` owns these names)
    <run_dir>/stages/<name>/checkpoints/ training checkpoints (``latest`` points at the newest complete one)
    <run_dir>/stages/<name>/metrics.jsonl one line per step
    <run_dir>/stages/<name>/lineage.json  parents, split hashes, config hash, final checkpoint, ledger
    <run_dir>/stages/<name>/eval.json     avg@k of the stage's final policy
    <run_dir>/stages/<name>/COMPLETE      written last; a stage with it is skipped on re-run
    <run_dir>/stages/<name>/LOCK          held by the stage job while it runs
    <run_dir>/report/                    report.md, report.json, *.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE_EVAL = "base_eval"  # pseudo-stage name of the job that evaluates the base models


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @staticmethod
    def of(run_dir: str | Path) -> "RunLayout":
        return RunLayout(Path(run_dir).resolve())

    @property
    def plan(self) -> Path:
        return self.root / "plan.resolved.yaml"

    @property
    def toy_world(self) -> Path:
        return self.root / "toy_world"

    def base_model(self, role: str) -> Path:
        return self.root / "models" / f"{role}_base"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def stage(self, name: str) -> Path:
        return self.root / "stages" / name

    def checkpoints(self, name: str) -> Path:
        return self.stage(name) / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.root / "LOCK"

    def stage_lock(self, name: str) -> Path:
        return self.stage(name) / "LOCK"

    def complete_marker(self, name: str) -> Path:
        return self.stage(name) / "COMPLETE"

    def is_complete(self, name: str) -> bool:
        return self.complete_marker(name).is_file()

    @property
    def report(self) -> Path:
        return self.root / "report"
