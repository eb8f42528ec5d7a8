"""Typed settings of the deployment commands (unknown keys and bad values are refused, naming the field)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SearchConfig(BaseModel):
    """Sub-net search (section 4.2): budgets, how many candidates, and the power iteration."""

    model_config = ConfigDict(extra="forbid")

    average_bits: list[float] = Field(default=[2.5, 3.0, 3.5], min_length=1)
    top_k: int = Field(default=5, gt=0)
    random_per_budget: int = Field(default=5, ge=0)  # random assignments of the same total bits
    # Device-aware budgets as fractions of the BitOPs of the all-max-bits network (empty: none).
    bitops_fractions: list[float] = Field(default=[])
    sensitivity_batches: int = Field(default=2, gt=0)
    max_iterations: int = Field(default=20, gt=0)
    tolerance: float = Field(default=1e-3, gt=0)
    seed: int = 0

    @field_validator("bitops_fractions")
    @classmethod
    def _fractions_in_range(cls, values: list[float]) -> list[float]:
        for v in values:
            if not 0 < v <= 1:
                raise ValueError(f"{v} is not in (0, 1]; a BitOPs budget is a fraction of the all-max-bits BitOPs")
        return values


class DataSource(BaseModel):
    """Validation images: 'digits' (the embedded data set) or a folder written by pipelines/prepare_data.py."""

    model_config = ConfigDict(extra="forbid")

    data: str = "digits"
    work_dir: str = ".bitmixer/deploy-data"  # where 'digits' is written once
    val_resolution: int = Field(default=32, gt=0)
    val_crop_ratio: float = Field(default=1.0, gt=0, le=1)
    batch_size: int = Field(default=128, gt=0)
    max_batches: int | None = Field(default=None, gt=0)  # evaluate on the first N batches only


class TrackingTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or MLflow's own default
    experiment: str = "bitmixer-deploy"
    run_name: str | None = None

    @field_validator("tracking_uri")
    @classmethod
    def _credentials_to_environment(cls, uri: str | None) -> str | None:
        """user:password@ in the URI goes to MLFLOW_TRACKING_USERNAME / PASSWORD; the URI keeps none."""
        from orchestrator.tracking.credentials import credentials_to_environment
        return None if uri is None else credentials_to_environment(uri)


class FindSubnetsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    search: SearchConfig = SearchConfig()
    data: DataSource = DataSource()
    tracking: TrackingTarget = TrackingTarget()
    out_dir: str | None = None  # also keep the figures and the table here


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    out: str
    lower_bits: str = Field(default="exact", pattern="^(exact|derived)$")
