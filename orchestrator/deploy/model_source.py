"""Where a trained meta-network comes from: a checkpoint path, an exported artifact, or an MLflow URI.

The checkpoint format is the consolidated ``model.pt`` the engine writes with ``torch.save``:
``{"model_name": str, "build_kwargs": dict, "state_dict": dict, ...}`` (extra keys are ignored).
A folder holding ``model.pt`` and a Bit-Mixer artifact (``pipelines/export.py``) are accepted as well.
MLflow URIs (``runs:/<id>/model.pt``, ``models:/<name>/<version>``, ``mlflow-artifacts:/...``) are
downloaded with the current tracking URI first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import bitmixer_core as core
from bitmixer_core.export import MAGIC, load_meta_network

MODEL_FILE = "model.pt"
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "http://", "https://")


@dataclass
class LoadedModel:
    model: nn.Module
    model_name: str
    build_kwargs: dict
    source: str


def _local_path(uri: str, tracking_uri: str | None) -> Path:
    if uri.startswith(_MLFLOW_SCHEMES):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    else:
        local = Path(uri)
        if not local.exists():
            raise FileNotFoundError(
                f"model {uri!r} does not exist; pass a model.pt checkpoint, a folder holding one, an exported "
                "artifact, or an MLflow URI such as runs:/<run_id>/model.pt."
            )
    if local.is_dir():
        if not (local / MODEL_FILE).is_file():
            raise FileNotFoundError(f"folder {uri!r} holds no {MODEL_FILE}; pass the checkpoint file itself.")
        local = local / MODEL_FILE
    return local


def load_model_source(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Rebuild the meta-network named by ``uri`` (eval mode, CPU); MLflow URIs resolve against
    ``tracking_uri`` (default: the current one)."""
    path = _local_path(str(uri), tracking_uri)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        model, header = load_meta_network(path)
        return LoadedModel(model, header["model_name"], header["build_kwargs"], str(uri))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{uri!r} is neither a model.pt checkpoint nor an exported artifact ({err}).") from None
    missing = [k for k in ("model_name", "build_kwargs", "state_dict") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"checkpoint {uri!r} lacks {missing}; it must be a dict with model_name, build_kwargs "
                         "and state_dict (the engine's consolidated model.pt).")
    model = core.build_model(payload["model_name"], **payload["build_kwargs"])
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    return LoadedModel(model, payload["model_name"], payload["build_kwargs"], str(uri))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_name: str, build_kwargs: dict) -> Path:
    """Write a model.pt in the engine's format, atomically (the engine's writer, with no stage history)."""
    from orchestrator.engine.checkpoint import save_model_pt

    return save_model_pt(path, net=model, model_name=model_name, build_kwargs=build_kwargs,
                         stage="export", epoch=0, metrics={})
