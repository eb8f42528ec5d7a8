"""Where a trained meta-network comes from: a checkpoint, an exported artifact, or an MLflow / S3 reference.

References resolve through the engine's one loader (`orchestrator.engine.checkpoint.resolve_model_pt`):
a local path (a ``model.pt``, a folder holding one, or a Bit-Mixer artifact written by
``pipelines/export.py``), ``runs:/<id>/model.pt``, ``models:/<name>/<version>`` or ``s3://bucket/key``; any
other scheme is refused. A ``model.pt`` is read as tensors and plain data only (never unpickled objects);
an artifact is JSON plus raw arrays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bitmixer_core.export import MAGIC, load_meta_network
from orchestrator.engine.checkpoint import MODEL_FILE, model_from_payload, read_model_file, resolve_model_pt


@dataclass
class LoadedModel:
    model: nn.Module
    model_name: str
    build_kwargs: dict
    source: str


def load_model_source(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Rebuild the meta-network named by ``uri`` (eval mode, CPU); MLflow URIs resolve against
    ``tracking_uri`` (default: the current one)."""
    path = resolve_model_pt(str(uri), tracking_uri)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        model, header = load_meta_network(path)
        return LoadedModel(model, header["model_name"], header["build_kwargs"], str(uri))
    payload = read_model_file(path, shown=str(uri))
    model = model_from_payload(payload)
    model.eval()
    return LoadedModel(model, payload["model_name"], payload["build_kwargs"], str(uri))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_name: str, build_kwargs: dict) -> Path:
    """Write a model.pt in the engine's format, atomically (the engine's writer, with no stage history)."""
    from orchestrator.engine.checkpoint import save_model_pt

    return save_model_pt(path, net=model, model_name=model_name, build_kwargs=build_kwargs,
                         stage="export", epoch=0, metrics={})
