"""Typed config tree (schema), the stage-kind registry (kinds), YAML loading with overrides (loader), and plan
validation (validate)."""

from megatron_s2d.config.kinds import KINDS, config_class
from megatron_s2d.config.loader import apply_overrides, from_dict, load_plan, plan_from_dict, to_dict
from megatron_s2d.config.schema import (
    ClipConfig, DataConfig, EvalConfig, EvalSetConfig, GRPOConfig, GRPOStageConfig, LaunchConfig, ModelConfig,
    OPDConfig, OPDStageConfig, OptimConfig, PlanConfig, RolloutConfig, RolloutCorrectionConfig, SlurmConfig, SplitConfig, StageBase,
    StageConfig, TrackingConfig, VLLMConfig, WarmupConfig, WarmupStageConfig,
)

__all__ = [
    "KINDS", "ClipConfig", "DataConfig", "EvalConfig", "EvalSetConfig", "GRPOConfig", "GRPOStageConfig",
    "LaunchConfig", "ModelConfig", "OPDConfig", "OPDStageConfig", "OptimConfig", "PlanConfig", "RolloutConfig", "RolloutCorrectionConfig",
    "SlurmConfig", "SplitConfig", "StageBase", "StageConfig", "TrackingConfig", "VLLMConfig", "WarmupConfig",
    "WarmupStageConfig", "apply_overrides", "from_dict", "config_class", "load_plan", "plan_from_dict", "to_dict",
]
