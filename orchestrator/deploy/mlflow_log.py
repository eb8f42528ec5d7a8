"""Logging deployment results to MLflow: figures as PNG artifacts, tables as JSON, summary metrics."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def resolve_target(target) -> tuple[Any, str]:
    """(MlflowClient, run_id) from an active run / Run, a run id, a client + run id pair, or None (active run)."""
    from mlflow.tracking import MlflowClient

    if isinstance(target, tuple) and len(target) == 2:
        return target
    if isinstance(target, str):
        return MlflowClient(), target
    if target is None or isinstance(target, MlflowClient):
        import mlflow

        run = mlflow.active_run()
        if run is None:
            raise ValueError("no MLflow run is active; pass a run, a run id or (MlflowClient, run_id).")
        return (target or MlflowClient()), run.info.run_id
    info = getattr(target, "info", None)
    if info is None or not hasattr(info, "run_id"):
        raise ValueError(f"cannot log to {target!r}: pass an MLflow run, a run id or (MlflowClient, run_id).")
    return MlflowClient(), info.run_id


def log_figures(target, figures: dict, artifact_dir: str) -> list[str]:
    client, run_id = resolve_target(target)
    paths = []
    for name, fig in figures.items():
        path = f"{artifact_dir}/{name}" if artifact_dir else name
        client.log_figure(run_id, fig, path)
        paths.append(path)
    return paths


def log_json(target, data, artifact_path: str) -> None:
    client, run_id = resolve_target(target)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(artifact_path))
        with open(local, "w") as f:
            json.dump(data, f, indent=1)
        client.log_artifact(run_id, local, os.path.dirname(artifact_path) or None)


def log_metrics(target, metrics: dict[str, float]) -> None:
    client, run_id = resolve_target(target)
    for key, value in metrics.items():
        # MLflow metric names allow / and = but not spaces; keep ours as they are
        client.log_metric(run_id, key.replace("<=", "_le_").replace("=", "_"), float(value))
