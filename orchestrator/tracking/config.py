"""Where a stage records itself in MLflow."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.tracking.credentials import credentials_to_environment


def default_tracking_uri() -> str:
    """The local default: a sqlite store in the working folder (MLflow refuses a plain file store)."""
    return f"sqlite:///{Path(os.getcwd()).resolve() / 'mlruns.db'}"


class TrackingConfig(BaseModel):
    """MLflow settings of one stage; only rank 0 talks to the tracking server.

    A tracking URI with credentials (`http://user:password@host:5000`) is split when the config is read: the
    credentials go to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this process (MLflow reads
    them there; the Ray it starts inherits them) and `tracking_uri` keeps the URI without them, so they never
    reach a param, a config artifact, a log line or the config hash.
    """

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
        uri = credentials_to_environment(uri)
        if not uri.startswith(("http://", "https://", "sqlite:///", "databricks", "file:")):
            raise ValueError(f"tracking_uri {uri!r} is not an MLflow tracking URI; use http://host:port "
                             f"of an MLflow server or sqlite:///path/to/mlruns.db")
        return uri
