"""Typed config tree (schema), YAML loading with overrides (loader), and plan validation (validate)."""

from megatron_s2d.config.loader import apply_overrides, from_dict, load_plan, to_dict
from megatron_s2d.config.schema import (
    DataConfig, DistillConfig, EvalConfig, EvalSetConfig, GRPOConfig, LaunchConfig, ModelConfig, OptimConfig,
    PlanConfig, RolloutConfig, SlurmConfig, SplitConfig, StageConfig,
)

__all__ = [
    "DataConfig", "DistillConfig", "EvalConfig", "EvalSetConfig", "GRPOConfig", "LaunchConfig", "ModelConfig",
    "OptimConfig", "PlanConfig", "RolloutConfig", "SlurmConfig", "SplitConfig", "StageConfig", "apply_overrides",
    "from_dict", "load_plan", "to_dict",
]
