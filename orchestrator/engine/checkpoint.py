"""The consolidated checkpoint `model.pt`: a plain PyTorch state dict plus what is needed to rebuild the net.

    {"model_name", "build_kwargs", "state_dict", "stage", "epoch", "metrics"}

It is what the next stage starts from, what a teacher or an export loads, and what MLflow keeps. Written to
a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import bitmixer_core as core

MODEL_FILE = "model.pt"


def build_from_kwargs(name: str, build_kwargs: dict) -> nn.Module:
    """bitmixer_core.build_model from the plain-data kwargs of ModelConfig.build_kwargs() (the core takes
    bits and quantizer options as plain mappings)."""
    return core.build_model(name, **build_kwargs)


def save_model_pt(path: str | os.PathLike, *, net: nn.Module, model_name: str, build_kwargs: dict,
                  stage: str, epoch: int, metrics: dict) -> Path:
    """Write model.pt atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fp32 on disk whatever the engine trained in (a bf16 engine's weights load into any later stage).
    state_dict = {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                  for k, v in net.state_dict().items()}
    payload = {"model_name": model_name, "build_kwargs": build_kwargs, "state_dict": state_dict,
               "stage": stage, "epoch": epoch, "metrics": dict(metrics)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def state_dict_digest(state_dict: dict) -> str:
    """sha256 over a state dict's names and tensor bytes (proves which weights a stage started from)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def resolve_model_pt(uri: str, tracking_uri: str | None = None) -> Path:
    """A local model.pt from a path (a file or a folder holding model.pt) or an MLflow artifact URI
    (runs:/<run>/model.pt, mlflow-artifacts:/..., models:/...), downloaded with the current tracking URI."""
    if "://" not in uri and not uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        path = Path(uri)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model checkpoint {uri!r} does not exist; give the model.pt written by "
                                    f"the previous stage (or its MLflow URI).")
        return path
    import mlflow
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    return local / MODEL_FILE if local.is_dir() else local


def read_model_pt(uri: str, tracking_uri: str | None = None) -> dict:
    return torch.load(resolve_model_pt(uri, tracking_uri), map_location="cpu", weights_only=False)


def load_model(uri: str, tracking_uri: str | None = None) -> nn.Module:
    """Rebuild the network saved in a model.pt and load its weights (step sizes, every BN entry too)."""
    return model_from_payload(read_model_pt(uri, tracking_uri))


def model_from_payload(payload: dict) -> nn.Module:
    net = build_from_kwargs(payload["model_name"], payload["build_kwargs"])
    net.load_state_dict(payload["state_dict"], strict=True)
    return net


def load_weights(net: nn.Module, uri: str, *, expect_model: str, tracking_uri: str | None = None) -> dict:
    """Load a previous stage's model.pt into `net` (strict: the architecture must match); returns the payload."""
    payload = read_model_pt(uri, tracking_uri)
    if payload.get("model_name") != expect_model:
        raise ValueError(f"checkpoint {uri!r} holds a {payload.get('model_name')!r}, not a {expect_model!r}; "
                         f"init_from / teacher_uri must come from the same architecture.")
    net.load_state_dict(payload["state_dict"], strict=True)
    return payload
