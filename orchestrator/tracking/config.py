"""Where a stage records itself in MLflow."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


def default_tracking_uri() -> str:
    """The local default: a sqlite store in the working folder (MLflow refuses a plain file store)."""
    return f"sqlite:///{Path(os.getcwd()).resolve() / 'mlruns.db'}"


class TrackingConfig(BaseModel):
    """MLflow settings of one stage; only rank 0 talks to the tracking server."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(default_factory=default_tracking_uri,
                              description="MLflow tracking URI: http(s)://host:port of a server, or "
                                          "sqlite:///path.db (default: mlruns.db in the working folder).")
    experiment: str = Field("bitmixer", description="MLflow experiment name the stage's run goes into.")
    parent_run_id: str | None = Field(None, description="Run id of the pipeline run this stage nests under.")
    run_name: str | None = Field(None, description="Run name; defaults to the stage name.")
    connect_timeout_s: float = Field(10.0, gt=0, description="How long to wait for the tracking server "
                                                             "before failing the stage at start.")

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if not uri.startswith(("http://", "https://", "sqlite:///", "databricks", "file:")):
            raise ValueError(f"tracking_uri {uri!r} is not an MLflow tracking URI; use http://host:port "
                             f"of an MLflow server or sqlite:///path/to/mlruns.db")
        return uri
