"""The distributed engine: one Bit-Mixer stage = one Ray TorchTrainer run with DeepSpeed, FFCV and MLflow.

    from orchestrator.engine import StageConfig, run_stage, config_hash
    result = run_stage(StageConfig.model_validate(yaml.safe_load(open("stage.yaml"))))
"""
from orchestrator.engine.config import (DeepSpeedConfig, DistillConfig, ModelConfig, OptimConfig,
                                        PolicyConfig, ScalingConfig, StageConfig, config_hash)
from orchestrator.tracking.config import TrackingConfig


def __getattr__(name: str):
    # run_stage / StageResult import Ray and MLflow: load them only when asked, so configs stay light.
    if name in ("run_stage", "StageResult"):
        from orchestrator.engine import stage
        return getattr(stage, name)
    raise AttributeError(name)


__all__ = ["StageConfig", "ModelConfig", "OptimConfig", "PolicyConfig", "DistillConfig", "DeepSpeedConfig",
           "ScalingConfig", "TrackingConfig", "config_hash", "run_stage", "StageResult"]
